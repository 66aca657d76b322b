"""Build hook for the optional C accelerators; all metadata lives in setup.cfg.

``optional=True``: where no compiler (or, for ``_fastpath``, no OpenSSL headers:
Debian's ``libssl-dev``) is present the build goes on and cryptfuse uses its
Python paths instead: the numpy XTS tweak chain and the Python request loop.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("cryptfuse._xts", ["cryptfuse/_xts.c"], optional=True, extra_compile_args=["-O3"]),
        Extension(
            "cryptfuse._fastpath",
            ["cryptfuse/_fastpath.c"],
            libraries=["crypto"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers"],
        ),
    ]
)
