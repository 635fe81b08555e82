from setuptools import Extension, setup

# The C codec is optional: without a compiler the package installs with the pure-Python
# codec (gearoffload.protocol.ACCELERATED tells which one is in use).
setup(
    ext_modules=[
        Extension("gearoffload._codec", ["gearoffload/_codec.c"], optional=True),
    ],
)
