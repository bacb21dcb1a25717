"""A newcomer's path through launch/ and configs/own_images.py (issue 28): prepare_data.sh packs a flat folder of
photos, gpu.sh runs from any directory, the Colab notebook installs the package when only an uploaded repository
is there, and configs/own_images.py trains on a generated folder of images.

The shell scripts run as subprocesses without jax (a stand-in python for gpu.sh); the notebook's install decision is
its own functions, taken from the cell and called without running pip.
"""

import ast
import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from simdino_jax import config as config_lib
from simdino_jax.data.sources import folder as folder_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
OWN_IMAGES = os.path.join(ROOT, "configs", "own_images.py")


def write_photos(directory, names, size=(40, 30)):
  """Small random RGB images under ``directory`` (any sub-paths in ``names``)."""
  rng = np.random.default_rng(0)
  for name in names:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def bash(script, *args, cwd, env=None):
  return subprocess.run(
    ["bash", os.path.join(LAUNCH, script), *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    env=dict(os.environ, **(env or {})),
    timeout=120,
  )


# ---- prepare_data.sh folder ----------------------------------------------------------------------------------------
def test_prepare_data_folder_packs_a_flat_folder_the_folder_source_reads(tmp_path):
  photos = tmp_path / "photos"
  write_photos(photos, ["a.jpg", "b.PNG", "trip/c.jpeg", ".thumbs/d.jpg"])
  (photos / "notes.txt").write_text("not an image")
  out = bash("prepare_data.sh", "folder", "photos", "photos.tar", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert "3 images" in out.stdout and "unlabelled" in out.stdout
  with tarfile.open(tmp_path / "photos.tar") as tar:
    assert sorted(os.path.normpath(n) for n in tar.getnames()) == ["a.jpg", "b.PNG", "trip/c.jpeg"]
  source = folder_source.load_folder(str(tmp_path / "photos.tar"), "train")
  assert len(source) == 3 and source.num_classes == 0 and (np.asarray(source.labels) == -1).all()


def test_prepare_data_folder_refuses_a_folder_without_images_in_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("x")
  out = bash("prepare_data.sh", "folder", "empty", "empty.tar", cwd=tmp_path)
  assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no .jpg/.jpeg/.png images" in out.stderr
  assert not (tmp_path / "empty.tar").exists()


def test_prepare_data_folder_still_packs_only_the_split_directories(tmp_path):
  write_photos(tmp_path / "data", ["train/cat/1.png", "test/cat/2.png", "extra/3.png"])
  out = bash("prepare_data.sh", "folder", "data", "data.tar", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  with tarfile.open(tmp_path / "data.tar") as tar:
    files = sorted(m.name for m in tar.getmembers() if m.isfile())
  assert files == ["test/cat/2.png", "train/cat/1.png"]


def test_prepare_data_folder_max_side_downscales_large_photos_upright(tmp_path):
  photos = tmp_path / "photos"
  write_photos(photos, ["small.png"])
  exif = Image.Exif()
  exif[0x0112] = 6  # EXIF orientation: the camera was turned, show rotated by 90 degrees
  big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (900, 1200, 3), dtype=np.uint8))
  big.save(photos / "big.jpg", exif=exif)
  env = {"MAX_SIDE": "300", "PYTHON": sys.executable}
  out = bash("prepare_data.sh", "folder", "photos", "photos.tar", cwd=tmp_path, env=env)
  assert out.returncode == 0, out.stderr
  assert "1 of 2 images downscaled to at most 300 px" in out.stdout
  source = folder_source.load_folder(str(tmp_path / "photos.tar"), "train")
  shapes = {source.image_path(i).split(":")[-1]: source.decode(i).shape for i in range(len(source))}
  assert shapes == {"big.jpg": (300, 225, 3), "small.png": (30, 40, 3)}  # upright: portrait, longer side 300
  with tarfile.open(tmp_path / "photos.tar") as tar:
    assert tar.extractfile("small.png").read() == (photos / "small.png").read_bytes()  # small ones as they were
  bad = bash("prepare_data.sh", "folder", "photos", "x.tar", cwd=tmp_path, env={"MAX_SIDE": "big"})
  assert bad.returncode == 1 and "MAX_SIDE must be a positive number" in bad.stderr


# ---- gpu.sh from another directory ---------------------------------------------------------------------------------
STANDIN_PYTHON = """#!/usr/bin/env bash
pwd > "$RECORD"
printf '%s\\n' "$@" >> "$RECORD"
"""


def run_gpu_sh(tmp_path, *args):
  """gpu.sh started in tmp_path/elsewhere with a stand-in interpreter that records its directory and arguments."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").write_text(STANDIN_PYTHON)
  (venv / "bin" / "python").chmod(0o755)
  cwd = tmp_path / "elsewhere"
  cwd.mkdir(exist_ok=True)
  record = tmp_path / "record.txt"
  env = {"VENV": str(venv), "SKIP_INSTALL": "1", "RECORD": str(record)}
  out = bash("gpu.sh", *args, cwd=cwd, env=env)
  assert out.returncode == 0, out.stderr
  directory, *argv = record.read_text().splitlines()
  return cwd, directory, argv


def test_gpu_sh_from_another_directory_takes_the_repository_config_and_keeps_the_callers_paths(tmp_path):
  cwd, directory, argv = run_gpu_sh(tmp_path, "configs/own_images.py:photos", "runs/photos", "--config.seed=1")
  # The trainer runs where gpu.sh was started, so the relative workdir and data path are the caller's.
  assert os.path.realpath(directory) == os.path.realpath(cwd)
  assert argv == [
    "-m",
    "simdino_jax.train",
    f"--config={ROOT}/configs/own_images.py:photos",
    "--workdir=runs/photos",
    "--config.seed=1",
  ]


def test_gpu_sh_prefers_a_config_file_in_the_callers_directory(tmp_path):
  (tmp_path / "elsewhere" / "configs").mkdir(parents=True)
  (tmp_path / "elsewhere" / "configs" / "demo.py").write_text("")
  _, _, argv = run_gpu_sh(tmp_path, "configs/demo.py", "/tmp/w")
  assert argv[2] == "--config=configs/demo.py"


def test_gpu_sh_installs_into_the_repository_from_any_directory(tmp_path):
  out = bash("gpu.sh", "configs/demo.py", "w", cwd=tmp_path, env={"DRY_RUN": "1", "VENV": ".venv-test-unused"})
  assert out.returncode == 0, out.stderr
  venv_python = os.path.join(ROOT, ".venv-test-unused", "bin", "python")
  assert f"+ {venv_python} -m pip install -q -e .\\[cuda\\]" in out.stderr.splitlines()
  assert not os.path.exists(os.path.join(ROOT, ".venv-test-unused"))


# ---- Colab: the install decision -----------------------------------------------------------------------------------
def notebook_install_functions():
  """``installed`` and ``install_plan`` as defined in the notebook's settings cell (pip is never run)."""
  with open(os.path.join(LAUNCH, "colab.ipynb")) as f:
    cell = "".join(json.load(f)["cells"][1]["source"])
  tree = ast.parse(cell)
  defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("installed", "install_plan")]
  namespace = {"os": os, "sys": sys, "importlib": importlib}
  exec(compile(ast.Module(body=defs, type_ignores=[]), "colab.ipynb", "exec"), namespace)
  return namespace["installed"], namespace["install_plan"]


def uploaded_repository(tmp_path):
  """/content/simdino_jax as a user uploads it: the repository, whose package folder has the same name."""
  repo = tmp_path / "simdino_jax"
  (repo / "simdino_jax").mkdir(parents=True)
  (repo / "simdino_jax" / "__init__.py").write_text("")
  (repo / "pyproject.toml").write_text("[project]\nname = 'simdino_jax'\n")
  return repo


def test_colab_installs_an_uploaded_repository_that_find_spec_mistakes_for_installed(tmp_path, monkeypatch):
  installed, install_plan = notebook_install_functions()
  repo = uploaded_repository(tmp_path)
  site = tmp_path / "site-packages"  # a runtime without the package
  site.mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", ["", str(tmp_path), str(site)])
  monkeypatch.delitem(sys.modules, "simdino_jax", raising=False)
  assert importlib.util.find_spec("simdino_jax") is not None  # the folder, seen from the working directory
  assert not installed()
  assert install_plan(str(repo), "", "gpu") == [[sys.executable, "-m", "pip", "install", "-q", "-e", f"{repo}[cuda]"]]


def test_colab_skips_the_install_when_the_package_is_pip_installed(tmp_path):
  installed, install_plan = notebook_install_functions()
  site = tmp_path / "site-packages"
  (site / "simdino_jax-0.1.0.dist-info").mkdir(parents=True)
  (site / "simdino_jax-0.1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: simdino_jax\n")
  assert installed(path=[str(site)]) and not installed(path=[str(tmp_path)])
  assert install_plan(str(tmp_path / "absent"), "", "cpu", path=[str(site)]) == []
  assert installed()  # this test environment's own editable install


def test_colab_without_repository_or_url_says_both_ways(tmp_path):
  _, install_plan = notebook_install_functions()
  with pytest.raises(SystemExit) as e:
    install_plan(str(tmp_path / "simdino_jax"), "", "tpu", path=[str(tmp_path)])
  message = str(e.value)
  assert "REPO_URL" in message and "REPO_DIR" in message and "pyproject.toml" in message and "unzip" in message
  url = "https://example.org/simdino_jax.git"
  clone, pip = install_plan(str(tmp_path / "r"), url, "tpu", path=[str(tmp_path)])
  assert clone == ["git", "clone", "--depth=1", url, str(tmp_path / "r")] and pip[-1] == f"{tmp_path / 'r'}[tpu]"


# ---- configs/own_images.py -----------------------------------------------------------------------------------------
def own_images_config(arg):
  return runpy.run_path(OWN_IMAGES)["get_config"](arg)


def test_own_images_gpu_mode_is_224px_vit_s16_and_cpu_mode_keeps_8x8_tokens():
  cpu, gpu = own_images_config("/photos"), own_images_config("folder:/photos,gpu")
  assert cpu.data.source == gpu.data.source == "folder:/photos"
  assert (cpu.data.global_size, cpu.data.local_size, cpu.model.variant, cpu.model.img_size) == (64, 32, "Ti/8", 64)
  assert (gpu.data.global_size, gpu.data.local_size, gpu.model.variant, gpu.data.num_local) == (224, 96, "S/16", 10)
  assert gpu.model.embed_dim == gpu.model.depth == gpu.model.num_heads == 0  # the variant's ViT-S
  assert (gpu.batch_size, gpu.loss.groups) == (64, 1)
  assert own_images_config("/a,b/photos").data.source == "folder:/a,b/photos"  # a comma that names no mode
  # Stored absolute (DIR/config.json is read by evaluate from anywhere); the shell leaves `~` after `:` to us.
  assert own_images_config("~/photos,gpu").data.source == "folder:" + os.path.expanduser("~/photos")
  assert own_images_config("photos").data.source == "folder:" + os.path.abspath("photos")
  for c in (cpu, gpu):
    config_lib.validate(c, num_devices=1)


def test_own_images_without_a_folder_is_refused_naming_the_argument():
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.source: .*configs/own_images\.py:/path/to/photos"):
    config_lib.validate(own_images_config(None), num_devices=1)


def test_own_images_trains_two_steps_on_a_flat_folder_of_photos(tmp_path):
  from simdino_jax.train import trainer

  write_photos(tmp_path / "photos", [f"img_{i}.jpg" for i in range(12)], size=(90, 70))
  c = own_images_config(str(tmp_path / "photos"))
  # Smaller network and batch for speed; the crop sizes and patch size stay the recipe's.
  c.batch_size, c.total_steps, c.warmup_steps, c.log_every, c.checkpoint_every = 4, 2, 1, 1, 0
  c.data.num_local = 2
  c.model.depth, c.model.embed_dim, c.model.num_heads = 1, 32, 2
  c.head.hidden_dim, c.head.out_dim = 64, 32
  workdir = tmp_path / "run"
  trainer.train(c, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
  assert not (workdir / "eval" / "knn.json").exists()  # unlabelled: the label-based evaluators are off
