"""Build hook for the optional C accelerators; all metadata lives in setup.cfg.

``optional=True``: where no compiler (or, for ``_fastpath``, no OpenSSL headers:
Debian's ``libssl-dev``) is present the build goes on and cryptfuse uses its
Python paths instead: the numpy XTS tweak chain and the Python request loop.
``_gcrypt`` (Debian's ``libgcrypt20-dev`` and ``nettle-dev``) brings the ciphers and
hashes OpenSSL lacks (Serpent, Twofish, LRW, lmk/tcw IVs, Whirlpool, Streebog; docs/ciphers.md);
without it only those are refused.

``CRYPTFUSE_EXT_FLAGS`` (``make test-sanitize``, ``make test-tsan``; see
docs/sanitizers.md) is added to both extensions' compile and link flags.  It goes
after our own ``-O`` levels, which CFLAGS from the environment cannot override.
"""

import os
import shlex

from setuptools import Extension, setup

EXTRA = shlex.split(os.environ.get("CRYPTFUSE_EXT_FLAGS", ""))

setup(
    ext_modules=[
        Extension(
            "cryptfuse._xts",
            ["cryptfuse/_xts.c"],
            optional=True,
            extra_compile_args=["-O3", *EXTRA],
            extra_link_args=EXTRA,
        ),
        Extension(
            "cryptfuse._gcrypt",
            ["cryptfuse/_gcrypt.c"],
            depends=["cryptfuse/_gcrypt.h"],
            libraries=["gcrypt", "nettle"],
            optional=True,
            extra_compile_args=[
                "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-Wno-unused-parameter", *EXTRA
            ],
            extra_link_args=EXTRA,
        ),
        Extension(
            "cryptfuse._fastpath",
            ["cryptfuse/_fastpath.c"],
            depends=["cryptfuse/_gcrypt.h"],
            libraries=["crypto"],
            optional=True,
            extra_compile_args=[
                "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", *EXTRA
            ],
            extra_link_args=EXTRA,
        ),
    ]
)
