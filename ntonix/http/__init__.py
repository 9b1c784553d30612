"""The client-facing HTTP side: connection guard, routes, error answers."""
