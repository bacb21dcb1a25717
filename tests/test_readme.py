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
