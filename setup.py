"""Build of the native half of the fast redaction tier (everything else is in pyproject.toml).

optional: where no C compiler is found the install still succeeds and `redaction` runs its
pure-Python path (same output, about twice the CPU); ops/setup-test-env.sh checks that the
test environment got the extension.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("redaction._native", ["redaction/_native.c"], optional=True)])
