"""Packaging for NTONIX, the AI inference gateway.

``twisted.plugins`` is listed by hand and has no ``__init__.py`` of ours: it is
Twisted's namespace, and shipping an ``__init__`` there would shadow Twisted's.
The mock LLM backend lives in ``mock/`` and installs as ``ntonix_mock`` so that
``twistd ntonix --demo`` and the tests can start it from an installed copy. The
root-level ``ntonix_mock`` is a symlink to ``mock``: with every package under
the project root (``package_dir={"": "."}``), an editable install is a plain
``.pth`` entry for the root, which twistd's plugin discovery (a scan of
``sys.path`` for ``twisted/plugins``) can see; a mapping would make setuptools
use an import hook that the scan cannot see.
"""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"',
    (HERE / "ntonix" / "_version.py").read_text(),
    re.M,
).group(1)

setup(
    name="ntonix",
    version=VERSION,
    description="AI inference gateway for OpenAI-compatible LLM backends, on Twisted",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "ntonix",
        "ntonix.http",
        "ntonix.upstream",
        "ntonix.routing",
        "ntonix.cache",
        "ntonix.observe",
        "ntonix.workers",
        "ntonix.share",
        "ntonix_mock",
        "twisted.plugins",
    ],
    # One root for every package, declared: setuptools then makes an editable
    # install a plain .pth entry (see the module docstring).
    package_dir={"": "."},
    package_data={"ntonix": ["py.typed"]},
    install_requires=[
        # 24.7.0 fixed the HTTP pipelining and request smuggling CVEs; take
        # the newest line we test on.
        # conch: the SSH admin console.
        "twisted[tls,conch]>=26.10.0",
        "pyopenssl>=24.0.0",
        "service-identity>=24.1.0",
        "treq>=24.9.1",
        "xxhash>=3.4.0",
        "attrs>=23.2.0",
        "prometheus-client>=0.20.0",
        # The data plane's HTTP/1.1 parser, both directions (llhttp, as in
        # Node.js and uvicorn): docs/adr/0009-httptools-data-plane.md.
        "httptools>=0.6.4",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-twisted>=1.14",
            "openai>=1.40",
            # The compose file is YAML, checked against a JSON schema.
            "pyyaml>=6.0",
            "jsonschema>=4.20",
            # Property-based tests: the request fuzzer and the JSON validator.
            "hypothesis>=6.100",
        ],
    },
    entry_points={
        "console_scripts": ["ntonix-mock = ntonix_mock.__main__:main"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
