"""The README's two Quickstart commands stay true: CI runs the README's test command verbatim."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
  with open(path) as f:
    return f.read()


def quickstart_commands():
  text = read(os.path.join(ROOT, "README.md"))
  section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL)


def test_quickstart_has_exactly_two_commands_demo_then_tests():
  demo, tests = quickstart_commands()
  assert "python -m simdino_jax.train --config=configs/demo.py" in demo and "pip install" in demo
  assert "pytest" in tests and "pip install" in tests and ".[test]" in tests


def test_ci_runs_the_readme_test_command_verbatim():
  _, tests = quickstart_commands()
  ci_lines = read(os.path.join(ROOT, ".ci", "run")).splitlines()
  assert tests.strip() in [line.strip() for line in ci_lines]


README_MAX_BYTES = 16384  # the README is the five-minute entry point; details belong in docs/


def markdown_files():
  docs = os.path.join(ROOT, "docs")
  names = sorted(n for n in os.listdir(docs) if n.endswith(".md")) if os.path.isdir(docs) else []
  return [os.path.join(ROOT, "README.md")] + [os.path.join(docs, n) for n in names]


def heading_anchors(text):
  """GitHub's anchors of the file's headings (lower case, punctuation dropped, spaces -> '-', duplicates -N)."""
  text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # no headings inside code blocks
  anchors, seen = set(), {}
  for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    anchors.add(slug if n == 0 else f"{slug}-{n}")
  return anchors


def relative_links(text):
  """Targets of the inline links and images outside code, without external URLs."""
  text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
  text = re.sub(r"`[^`\n]*`", "", text)
  targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
  return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.IGNORECASE)]


def test_readme_is_short():
  size = os.path.getsize(os.path.join(ROOT, "README.md"))
  assert size <= README_MAX_BYTES, f"README.md is {size} bytes (limit {README_MAX_BYTES}); move details to docs/"


def test_readme_names_no_path_outside_the_repository():
  text = read(os.path.join(ROOT, "README.md"))
  assert "../" not in text, [line for line in text.splitlines() if "../" in line]


def test_every_relative_link_points_to_an_existing_file_and_heading():
  broken = []
  for path in markdown_files():
    text = read(path)
    for target in relative_links(text):
      file_part, _, anchor = target.partition("#")
      dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
      where = f"{os.path.relpath(path, ROOT)}: ({target})"
      if not os.path.exists(dest):
        broken.append(f"{where} -> missing {os.path.relpath(dest, ROOT)}")
      elif anchor and dest.endswith(".md") and anchor not in heading_anchors(read(dest)):
        broken.append(f"{where} -> no heading #{anchor} in {os.path.relpath(dest, ROOT)}")
      elif not os.path.realpath(dest).startswith(os.path.realpath(ROOT) + os.sep):
        broken.append(f"{where} -> outside the repository")
  assert not broken, "\n".join(broken)


# ---- a newcomer's first hour (issue 28): install, own photos, cost ----------------------------------------------
def readme_section(title):
  text = read(os.path.join(ROOT, "README.md"))
  assert f"\n## {title}\n" in text, f"README.md has no section '## {title}'"
  return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def pyproject_extras():
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["optional-dependencies"]


def test_readme_installs_for_cpu_cuda_and_tpu_after_the_quickstart():
  text = read(os.path.join(ROOT, "README.md"))
  install = readme_section("Install on a GPU or TPU")
  assert text.index("## Quickstart") < text.index("## Install on a GPU or TPU")
  (block,) = re.findall(r"```bash\n(.*?)\n```", install, re.DOTALL)
  assert 'pip install -e ".[cuda]"' in block and 'pip install -e ".[tpu]"' in block
  assert "pip install -q -e ." in quickstart_commands()[0]  # the CPU install


def test_the_install_extras_exist_and_pull_the_matching_jax():
  extras = pyproject_extras()
  install = readme_section("Install on a GPU or TPU")
  for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', install):
    assert extra in extras, f"README installs .[{extra}], pyproject.toml has {sorted(extras)}"
  # jax's own extras (jax 0.10: cuda12 pulls jax-cuda12-plugin[with-cuda], tpu pulls libtpu), same jax range.
  jax_range = next(d for d in read_pyproject_dependencies() if d.startswith("jax>"))[len("jax") :]
  assert extras["cuda"] == [f"jax[cuda12]{jax_range}"] and extras["tpu"] == [f"jax[tpu]{jax_range}"]


def read_pyproject_dependencies():
  import tomllib

  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]["dependencies"]


def test_readme_takes_a_newcomer_from_own_photos_to_an_evaluated_export():
  section = readme_section("Your own photos")
  (block,) = re.findall(r"```bash\n(.*?)\n```", section, re.DOTALL)
  train, evaluate, export = [line.split("#")[0].split() for line in block.splitlines()]
  assert (
    train[:3] == ["python", "-m", "simdino_jax.train"] and "--config=configs/own_images.py:/path/to/photos" in train
  )
  workdir = next(a for a in train if a.startswith("--workdir="))
  assert evaluate[:3] == ["python", "-m", "simdino_jax.evaluate"] and workdir in evaluate
  assert export[:3] == ["python", "-m", "simdino_jax.export"] and workdir in export
  assert ",gpu" in section and "eval_source" in section
  assert os.path.exists(os.path.join(ROOT, "configs", "own_images.py"))
  assert "`configs/own_images.py:PATH[,gpu]`" in readme_section("Configs")


def test_readme_says_what_a_real_run_costs_and_that_the_batch_is_global():
  section = readme_section("What a real run costs")
  assert "`batch_size` is global" in section and "512 = the official 8 GPUs x\n64" in section
  assert "`loss.groups=8`" in section and "sqrt(8 x 0.05)" in section
  rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `")]
  recipes = {cells[0].strip().strip("`"): [c.strip() for c in cells[1:]] for cells in rows}
  assert {"demo.py", "own_images.py", "simdino_vitb16_in1k.py", "simdinov2_vitb16_in1k.py"} <= set(recipes)
  for name, (hardware, time, batch, expected) in recipes.items():
    assert os.path.exists(os.path.join(ROOT, "configs", name)), name
    assert "measured" in time or "estimate" in time, f"{name}: say whether {time!r} is measured or an estimate"
    assert hardware and batch.isdigit() and expected, name
    if name.endswith("_in1k.py"):  # no ImageNet run has been timed here: estimates until measured
      assert "estimate" in time, name
    # The global batch is the config's.
    import runpy

    get_config = runpy.run_path(os.path.join(ROOT, "configs", name))["get_config"]
    config = get_config("/photos") if name == "own_images.py" else get_config()
    assert int(batch) == config.batch_size, name
