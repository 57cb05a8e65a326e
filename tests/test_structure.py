"""The repository's shape (docs/design.md section 8): imports point one way, nothing points outside
the repository, and every runtime requirement is used."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The layers, bottom up: the library (common ... eval), the experiments that train through train.py,
# the entry points (demo.py: the old name of experiments.demo) and the benchmarks. A module imports
# only its own package and packages of lower layers; there are no exceptions. training/ and eval/
# share a layer, so neither imports the other.
LAYERS = {"common": 0, "unet": 1, "vae": 1, "clip": 1, "diffusion": 2, "retrinet": 3, "data": 3, "training": 4,
          "eval": 4, "experiments": 5, "train": 6, "sample": 6, "pretrain": 6, "demo": 6, "bench": 7}
ENTRY_POINTS = {"train", "sample", "demo", "pretrain"}
RUNTIME = [name for name in LAYERS if name != "bench"]


def _imports() -> dict[tuple[str, str], list[str]]:
    """{(importing package, imported package): [file:line, ...]} over every layer. Relative imports
    stay inside their package and are left out."""
    files = [p for p in ROOT.glob("*.py") if p.stem in LAYERS]
    files += [p for name in LAYERS if (ROOT / name).is_dir() for p in (ROOT / name).rglob("*.py")]
    found = {}
    for path in files:
        source = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                target = name.split(".")[0]
                if target in LAYERS and target != source:
                    found.setdefault((source, target), []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_package_has_a_layer():
    """Every top-level package, script folder and module of the repository (tests/ aside) is placed."""
    placed = set(LAYERS) | {"tests"}
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.rglob("*.py"))}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert folders | modules <= placed, sorted((folders | modules) - placed)


def test_imports_point_one_way():
    edges = _imports()
    assert ("training", "retrinet") in edges and ("diffusion", "unet") in edges  # the scan sees imports
    assert ("bench", "diffusion") in edges and ("experiments", "training") in edges
    wrong = {edge: where for edge, where in edges.items() if not LAYERS[edge[1]] < LAYERS[edge[0]]}
    assert not wrong, wrong
    into_entry_points = {edge: where for edge, where in edges.items() if edge[1] in ENTRY_POINTS}
    assert not into_entry_points, into_entry_points


def test_nothing_points_outside_the_repository():
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".txt", ".cfg", ".ini", "")
               and not any(part.startswith(".") or part in ("__pycache__", "demo-output") for part in
                           p.relative_to(ROOT).parts)]
    pattern = re.compile(r"\.\./shared|DESIGN\.md")
    hits = [str(p.relative_to(ROOT)) for p in tracked if p.stat().st_size < 2_000_000
            and pattern.search(p.read_text(encoding="utf-8", errors="ignore"))]
    assert hits == []


def test_every_runtime_requirement_is_imported():
    import_names = {"pillow": "PIL"}
    requirements = [re.split(r"[<>=! ]", line)[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    sources = "\n".join(p.read_text(encoding="utf-8") for name in RUNTIME
                        for p in ([ROOT / f"{name}.py"] if (ROOT / f"{name}.py").is_file() else
                                  (ROOT / name).rglob("*.py")))
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", sources, re.MULTILINE))
    unused = [r for r in requirements if import_names.get(r, r) not in imported]
    assert unused == [], f"listed in requirements.txt but imported nowhere: {unused}"
