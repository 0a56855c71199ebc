"""The docs cannot rot: every relative link (and its #anchor) in README.md and docs/*.md, and every
`python X.py` script, `python -m compact_vit.X` module and repository path (`configs/...`,
`benchmarks/...`, ...) quoted in their code (spans and blocks) exists; every page in docs/ is linked
from the README. Unquoted paths are prose (docs/recipes.md cites files of the authors' code)."""
import glob
import itertools
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))

FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`(?:[^`\n]|\n(?!\s*\n))+`")  # may wrap, not across paragraphs
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_LINK = re.compile(r"<(?:a|img)\b[^>]*?\b(?:href|src)=\"([^\"]+)\"", re.I)
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
SCRIPT = re.compile(r"\bpython3?\s+([^\s\-`'\"][^\s`'\"]*\.py)\b")
MODULE = re.compile(r"\bpython3?\s+-m\s+(compact_vit(?:\.\w+)*)")
# A repository path: a top-level folder, then path characters or a {a,b} brace group.
REPO_PATH = re.compile(r"(?<![\w/.$~-])((?:configs|benchmarks|compact_vit|tests|docs|\.ci)/"
                       r"(?:[\w./*-]|\{[\w,.-]*\})*)")
CHECKED_SUFFIXES = (".py", ".md", ".sh", ".png", ".json", ".txt", ".ini", ".toml", ".yaml", ".csv")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # configs/X.py, SEPVIT_REPO: stands for a name


def _strip_code(text: str) -> str:
  return INLINE_CODE.sub("", FENCE.sub("", text))


def slugs(text: str) -> set[str]:
  """GitHub's anchors for the headings of a page (lowercase, punctuation dropped, spaces to
  hyphens, -1, -2, ... for repeats)."""
  seen: dict[str, int] = {}
  out = set()
  for heading in HEADING.findall(FENCE.sub("", text)):
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    out.add(slug if count == 0 else f"{slug}-{count}")
  return out


def _expand_braces(path: str) -> list[str]:
  parts = re.split(r"(\{[^}]*\})", path)
  choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
  return ["".join(c) for c in itertools.product(*choices)]


def _module_exists(name: str, root: str) -> bool:
  """`python -m name` can run: name.py, or a package with __main__.py."""
  base = os.path.join(root, *name.split("."))
  return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__main__.py"))


def broken_references(text: str, page_dir: str, root: str = ROOT) -> list[str]:
  """What a page quotes that does not exist: links resolve against the page's folder, scripts,
  modules and repository paths against the repository root."""
  problems = []
  prose = _strip_code(text)
  code = "\n".join(FENCE.findall(text) + INLINE_CODE.findall(FENCE.sub("", text)))
  for target in LINK.findall(prose) + REF_LINK.findall(prose) + HTML_LINK.findall(prose):
    if SCHEME.match(target):
      continue  # https:, mailto:, gs: ...
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(page_dir, path)) if path else None
    if full is not None and not os.path.exists(full):
      problems.append(f"link {target}: {os.path.relpath(full, root)} does not exist")
      continue
    if anchor:
      if full is None:
        page_text = text
      elif full.endswith(".md") and os.path.isfile(full):
        with open(full, encoding="utf-8") as f:
          page_text = f.read()
      else:
        continue
      if anchor not in slugs(page_text):
        problems.append(f"link {target}: no heading with the anchor #{anchor}")
  for script in SCRIPT.findall(code):
    if not PLACEHOLDER.match(os.path.splitext(os.path.basename(script))[0]) and not os.path.isfile(
        os.path.join(root, script)):
      problems.append(f"script {script} does not exist")
  for module in MODULE.findall(code):
    if not _module_exists(module, root):
      problems.append(f"module {module} (python -m) does not exist")
  for quoted in REPO_PATH.findall(code):
    quoted = quoted.rstrip(".")
    if not (quoted.endswith("/") or quoted.endswith(CHECKED_SUFFIXES)):
      continue  # a run's output under a clone named like a folder (compact_vit/train.log)
    for path in _expand_braces(quoted):
      stems = [os.path.splitext(part)[0] for part in path.split("/")]
      if any(PLACEHOLDER.match(stem) for stem in stems):
        continue
      if not glob.glob(os.path.join(root, path)):
        problems.append(f"path {path} does not exist")
  return sorted(set(problems))


def _read(page: str) -> str:
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    return f.read()


@pytest.mark.parametrize("page", PAGES)
def test_every_quoted_link_script_module_and_path_exists(page):
  problems = broken_references(_read(page), os.path.dirname(os.path.join(ROOT, page)))
  assert not problems, f"{page}:\n" + "\n".join(problems)


def test_the_check_finds_what_is_broken():
  page = """# A page

## Next step: the run's outputs

[fine](imagenet.md), [fine anchor](#next-step-the-runs-outputs), [fine](../README.md#quick-start),
[gone](nowhere.md), [bad anchor](#no-such-heading), [bad anchor elsewhere](../README.md#nope),
![gone picture](../benchmarks/results/nothing.png), [site](https://example.com/x.md),
<img src="../benchmarks/results/zoo_top1_vs_gmacs.png"> <a href="../gone.md">gone</a>.

```bash
python train.py --config configs/deit_s.py:quick      # fine
python no_such_script.py --config configs/no_such_config.py
python -m compact_vit.profile --model deit_small_patch16_224 && python -m compact_vit.nothing
python search.py --config configs/X.py                # a placeholder
```

`configs/deit_{ti,s,zz}.py`, `configs/tftas_*_search.py`, `benchmarks/results/`, `tests/gone/`,
`python -m compact_vit.wrapped
--checkpoint FILE` (a span that wraps), and in prose, unchecked: OWNER/REPO configs/cfg.yaml.
"""
  assert broken_references(page, os.path.join(ROOT, "docs")) == sorted([
      "link nowhere.md: docs/nowhere.md does not exist",
      "link #no-such-heading: no heading with the anchor #no-such-heading",
      "link ../README.md#nope: no heading with the anchor #nope",
      "link ../benchmarks/results/nothing.png: benchmarks/results/nothing.png does not exist",
      "link ../gone.md: gone.md does not exist",
      "script no_such_script.py does not exist",
      "path configs/no_such_config.py does not exist",
      "module compact_vit.nothing (python -m) does not exist",
      "module compact_vit.wrapped (python -m) does not exist",
      "path configs/deit_zz.py does not exist",
      "path tests/gone/ does not exist",
  ])


def test_slugs_follow_github():
  assert slugs("# search.py\n## Multi-node GPU (SLURM)\n## ImageNet-1K: data\n## Speed\n## Speed\n"
               "```\n# not a heading\n```\n") == {
                   "searchpy", "multi-node-gpu-slurm", "imagenet-1k-data", "speed", "speed-1"}


def test_every_docs_page_is_linked_from_the_readme():
  readme_links = LINK.findall(_strip_code(_read("README.md")))
  linked = {os.path.normpath(target.partition("#")[0]) for target in readme_links}
  orphans = [page for page in PAGES[1:] if page not in linked]
  assert not orphans, f"docs pages that README.md does not link: {orphans}"


def test_readme_is_a_front_page_and_quotes_the_ci_test_command():
  readme = _read("README.md")
  assert len(readme.splitlines()) <= 250, "README.md is a front page: move details to docs/"
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci_command = [line for line in f.read().splitlines() if line.strip()][-1].strip()
  assert ci_command in readme, f"CI runs {ci_command!r}, which the README must show as is"
