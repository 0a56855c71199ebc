"""The package's layering (.importlinter) and what importing the models costs."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
  """Every contract of .importlinter: the layers (search > evaluator > trainer > objectives >
  losses > models > nn), the forbidden imports (models, nn, data, convert/profile) and no import
  cycle between sibling modules or packages."""
  out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                        "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True,
                       check=False, env=dict(os.environ, PYTHONPATH=ROOT))
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  assert "0 broken" in out.stdout and "BROKEN" not in out.stdout


def test_importing_models_loads_neither_tensorflow_nor_optax():
  code = ("import sys, compact_vit.models as m; m.create_model('deit_tiny_patch16_224');"
          "print(sorted(k for k in ('tensorflow', 'optax', 'torch', 'orbax', 'tensorflow_datasets')"
          " if k in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True)
  assert out.stdout.strip() == "[]", out.stdout
