"""The package's public names: `from rosa2_dspy import ...` works for each, and `import rosa2_dspy` stays light."""

import subprocess
import sys

import rosa2_dspy


def test_every_public_name_imports_from_the_package():
    from rosa2_dspy import ROSA2, LocalEngine, Session
    from rosa2_dspy.coadapt import Session as session
    from rosa2_dspy.teleprompt import ROSA2 as rosa2
    from rosa2_dspy.engine import LocalEngine as engine

    assert (ROSA2, Session, LocalEngine) == (rosa2, session, engine)
    assert all(getattr(rosa2_dspy, name) is not None for name in rosa2_dspy.__all__)


def test_importing_the_package_loads_neither_torch_nor_dspy():
    code = "import sys, rosa2_dspy; print('torch' in sys.modules or 'dspy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
