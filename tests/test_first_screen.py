"""The first screen of a run is ours: TensorFlow's load-time notices and TFDS's preparation lines
for the embedded dataset do not reach the terminal."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        check=True, env=dict(os.environ, PYTHONPATH=ROOT))


def test_tensorflow_loads_without_its_onednn_notice():
  out = _run("from compact_vit.data._tf import tf; import sys; print((tf.constant(1) + 1).numpy());"
             "print('other', file=sys.stderr)")
  assert out.stdout.strip() == "2"
  assert "oneDNN" not in out.stderr and "InitializeLog" not in out.stderr, out.stderr
  assert out.stderr.strip() == "other"


def test_preparing_the_embedded_dataset_prints_one_line(tmp_path):
  code = ("import ml_collections; from compact_vit.data import pipeline;"
          "print(pipeline.get_info(ml_collections.ConfigDict("
          f"{{'name': 'digits', 'data_dir': {str(tmp_path)!r}, 'eval_split': 'test'}})))")
  out = _run(code)
  lines = out.stdout.strip().splitlines()
  assert lines[0] == f"Preparing the embedded digits dataset (1,797 images, once) in {tmp_path}."
  assert len(lines) == 2 and lines[1].startswith("DatasetInfo(num_classes=10")
  assert "Unknown size" not in out.stdout + out.stderr and "dataset_info.json" not in out.stderr
  again = _run(code)  # prepared: nothing but the result
  assert again.stdout.strip().splitlines() == lines[1:]
