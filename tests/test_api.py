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


def test_the_readme_compile_example_runs(tmp_path, tiny_model_dir, monkeypatch):
    """The README's compile, evaluate, save and load example, as written, on the tiny model and 2+2 problems."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "ROSA2(" in b)
    code, n = re.subn(r'^MODEL, TRAIN, TEST, MAX_TOKENS = .*$',
                      f'MODEL, TRAIN, TEST, MAX_TOKENS = "{tiny_model_dir}", 4, 2, 8', block, flags=re.M)
    assert n == 1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "programs").mkdir()
    (tmp_path / "programs" / "math_solver.py").write_text((root / "programs" / "math_solver.py").read_text())
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert (tmp_path / "runs" / "readme" / "results.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "artifacts" / "readme" / "adapter").is_dir()  # the weights moved and were saved
    fresh, compiled = scope["fresh"], scope["compiled"]
    assert [p.signature.instructions for p in fresh.predictors()] == \
        [p.signature.instructions for p in compiled.predictors()]
