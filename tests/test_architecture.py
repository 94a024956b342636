"""The house's shape: imports flow one way (no circle, the core imports no certifier), and no file outgrows a read."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"certprune": ROOT / "certprune", "certprune.certify": ROOT / "certify", "certprune.models": ROOT / "models"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every certprune module ``name`` imports, at the top or inside a function (a late import is still an edge)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + ([base] if node.module else [])
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target not in (name, "certprune"):  # the package itself always loads first
                edges.add(target)
    return edges


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_circle():
    assert cycle(graph()) is None, " -> ".join(cycle(graph()))


def test_the_cycle_finder_finds_a_planted_circle():
    edges = graph()
    edges["certprune.quantities"] = {"certprune.cli"}  # the bottom importing the top
    assert cycle(edges) is not None


def reachable(edges, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# A reader of models, not a certifier: certify/ holds it for `verify --onnx`, and `--model FILE.onnx` builds with it
# (certprune.sources). It must stay a leaf that reaches no certifier itself.
MODEL_READERS = {"certprune.certify.onnx_import"}


@pytest.mark.parametrize("core", ["certprune.pipeline", "certprune.train", "certprune.masking", "certprune.losses",
                                  "certprune.runs", "certprune.config"])
def test_the_core_reaches_no_certifier_and_no_command_line(core):
    below = reachable(graph(), core)
    assert not {m for m in below if m.startswith("certprune.certify")} - MODEL_READERS, sorted(below)
    assert not below & {"certprune.cli", "certprune.sweep", "certprune.evaluation", "certprune.report"}


@pytest.mark.parametrize("reader", sorted(MODEL_READERS))
def test_a_model_reader_the_core_uses_reaches_no_certifier(reader):
    assert not {m for m in reachable(graph(), reader) if m.startswith("certprune.certify")}


def test_the_core_names_the_layers_the_milp_encodes_as_the_milp_does():
    from certprune.certify.milp_encoding import SUPPORTED
    from certprune.model_checks import MILP_LAYERS

    assert MILP_LAYERS == SUPPORTED


def test_only_lirpa_and_its_shims_import_auto_lirpa():
    for name, path in modules().items():
        text = path.read_text()
        if name not in ("certprune.lirpa", "certprune.lirpa_compat"):
            assert "import auto_LiRPA" not in text and "from auto_LiRPA" not in text, name


def test_no_source_file_is_over_300_lines():
    long = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in modules().values()}
    assert {path: lines for path, lines in long.items() if lines > 300} == {}
