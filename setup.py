"""Build hook for the optional C accelerator; all metadata lives in setup.cfg.

``optional=True``: where no compiler is present the build goes on and
cryptfuse's sector engine uses its numpy path instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("cryptfuse._xts", ["cryptfuse/_xts.c"], optional=True, extra_compile_args=["-O3"]),
    ]
)
