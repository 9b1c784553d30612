"""Between workers: the supervisor relays each worker's scheduler batch to
the other live workers, and to and from the other gateways (``bus.py``).

Workers say ``share`` (``{"b": batch}``) over the channel; the supervisor
names the source (``w<index>``) and tells every other live worker
``share`` (``{"src": ..., "b": batch}``). When a worker ends, the others
are told ``share_gone`` at once, and its restarted successor starts from
nothing. The batches are relayed as they came: each worker checks what it
applies (``wire.check_batch``), as it does for any peer.
"""

from typing import Any, Dict, Optional

from ntonix.workers.channel import encode


def source_of(proc: Any) -> str:
    return f"w{proc.index}"


class WorkerHub:
    def __init__(self, supervisor: Any, bus: Optional[Any] = None) -> None:
        self.supervisor = supervisor
        self.bus = bus
        self.relayed = 0
        supervisor.handlers["share"] = self.from_worker
        supervisor.on_worker_ended.append(self.worker_ended)

    def _tell(self, msg: Dict[str, Any], but: Any = None) -> None:
        # Encoded once, whatever the number of workers.
        data = encode(msg)
        for proc in self.supervisor.live_workers():
            if proc is not but:
                proc.channel.send_encoded(data)

    def from_worker(self, proc: Any, msg: Dict[str, Any]) -> None:
        batch = msg.get("b")
        src = source_of(proc)
        self._tell({"op": "share", "src": src, "b": batch}, but=proc)
        self.relayed += 1
        if self.bus is not None and isinstance(batch, dict):
            self.bus.publish(src, batch)

    def from_gateway(self, peer: str, batch: Dict[str, Any]) -> None:
        """Another gateway's process (from Redis, checked there)."""
        self._tell({"op": "share", "src": peer, "b": batch})

    def gone(self, peer: str) -> None:
        self._tell({"op": "share_gone", "src": peer})

    def worker_ended(self, proc: Any) -> None:
        src = source_of(proc)
        self.gone(src)
        if self.bus is not None:
            self.bus.ended(src)
