"""kvswap's vLLM integration checked against a vLLM version's source, without importing it.

vLLM releases change the KV-connector API (0.33 and 0.34 added hooks; base classes gain
abstract methods); only some versions run on a given machine (the CPU build stops at 0.32,
the lent GPUs run 0.25.1). :func:`check` reads a vLLM tree (a wheel or an installed
``site-packages``) and kvswap's integration modules with :mod:`ast` and reports what would
break there:

* a ``from vllm... import name`` that the version does not have (imports inside a hook the
  version's base class does not declare are skipped: that version never calls them);
* an abstract method of a vLLM base class that kvswap's subclass does not implement (the class
  could not be instantiated);
* an override whose kind (method, classmethod, property) or parameters do not accept the call
  the base declares (a missing ``**kwargs`` where the base has one, a required parameter the
  base does not pass, a positional one renamed or missing).

It also lists the base's hooks kvswap leaves at vLLM's default, for the docs.
"""

from __future__ import annotations

import ast
import dataclasses
import zipfile
from collections.abc import Iterator
from pathlib import Path

INTEGRATION = Path(__file__).resolve().parent.parent / "integrations" / "vllm"


def keep_sources(wheel: Path, out: Path) -> None:
    """Write ``out``, a zip of ``wheel``'s ``vllm/**.py`` files alone (about a tenth of a
    wheel's size: CI's disk holds the sources it reads, not the compiled kernels)."""
    partial = out.with_name(out.name + ".partial")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as sources:
        for name in source.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                sources.writestr(name, source.read(name))
    partial.replace(out)


class Tree:
    """The Python sources of one vLLM version: a wheel (``.whl``), a zip of its sources
    (:func:`keep_sources`) or a directory holding ``vllm/``."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self._zip = zipfile.ZipFile(where) if where.suffix in (".whl", ".zip") else None
        self._parsed: dict[str, ast.Module | None] = {}

    @property
    def version(self) -> str:
        text = self.read("vllm/_version.py") or ""
        for node in ast.parse(text).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") in ("__version__", "version")
                                                    for t in node.targets):
                if isinstance(node.value, ast.Constant):
                    return str(node.value.value)
        return self.where.name

    def read(self, path: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(path).decode()
            except KeyError:
                return None
        file = self.where / path
        return file.read_text() if file.is_file() else None

    def module(self, dotted: str) -> ast.Module | None:
        """The parsed module ``dotted`` (``a.b`` from ``a/b.py`` or ``a/b/__init__.py``), or None."""
        if dotted not in self._parsed:
            base = dotted.replace(".", "/")
            text = self.read(f"{base}.py") or self.read(f"{base}/__init__.py")
            self._parsed[dotted] = ast.parse(text) if text is not None else None
        return self._parsed[dotted]

    def is_package(self, dotted: str) -> bool:
        return self.read(dotted.replace(".", "/") + "/__init__.py") is not None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def defined_names(module: ast.Module) -> set[str]:
    """Top-level names a module binds (classes, functions, assignments, imports)."""
    names: set[str] = set()
    for node in _top_level(module.body):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements at module level, looking into ``if``/``try`` blocks (version guards)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _top_level(block)
        else:
            yield node


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "method", "classmethod", "staticmethod", "property"
    positional: tuple[str, ...]  # after self/cls
    required: int  # positional parameters without a default
    kwonly_required: tuple[str, ...]
    var_args: bool
    var_kwargs: bool
    abstract: bool

    @classmethod
    def of(cls, node: ast.FunctionDef | ast.AsyncFunctionDef) -> Method:
        decorators = {d.id if isinstance(d, ast.Name) else d.attr if isinstance(d, ast.Attribute) else ""
                      for d in node.decorator_list}
        kind = next((k for k in ("classmethod", "staticmethod", "property") if k in decorators), "method")
        args = node.args
        positional = [a.arg for a in (*args.posonlyargs, *args.args)]
        if kind != "staticmethod" and positional:
            positional = positional[1:]
        required = len(positional) - len(args.defaults)
        kwonly = tuple(a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None)
        return cls(node.name, kind, tuple(positional), required, kwonly, args.vararg is not None,
                   args.kwarg is not None, "abstractmethod" in decorators)


def methods(node: ast.ClassDef) -> dict[str, Method]:
    return {item.name: Method.of(item) for item in node.body
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)}


def find_class(module: ast.Module, name: str) -> ast.ClassDef | None:
    return next((n for n in _top_level(module.body) if isinstance(n, ast.ClassDef) and n.name == name), None)


def compatible(ours: Method, theirs: Method) -> str | None:
    """Why ``ours`` cannot take the calls ``theirs`` declares, or None when it can."""
    if ours.kind != theirs.kind:
        return f"is a {ours.kind}, vLLM's a {theirs.kind}"
    if theirs.var_kwargs and not ours.var_kwargs:
        return "takes no **kwargs, vLLM's does"
    if ours.required > len(theirs.positional) and not theirs.var_args:
        return f"requires {ours.required} arguments, vLLM passes at most {len(theirs.positional)}"
    missing_kw = [k for k in ours.kwonly_required if k not in theirs.kwonly_required]
    if missing_kw:
        return f"requires keyword {missing_kw}, which vLLM does not pass"
    for index, name in enumerate(theirs.positional):
        if index < len(ours.positional):
            if ours.positional[index] != name and not name.startswith("_"):
                return f"parameter {index + 1} is {ours.positional[index]!r}, vLLM's {name!r} (called by keyword?)"
        elif not ours.var_args and not ours.var_kwargs:
            return f"has no parameter {name!r}"
    return None


@dataclasses.dataclass
class Report:
    version: str
    problems: list[str] = dataclasses.field(default_factory=list)
    defaults: list[str] = dataclasses.field(default_factory=list)  # base hooks kvswap leaves to vLLM


def _vllm_bases(tree: Tree, ours: ast.Module, node: ast.ClassDef) -> list[tuple[str, ast.ClassDef]]:
    """vLLM classes ``node`` subclasses (through ``from vllm... import``), with their modules."""
    imported = {alias.asname or alias.name: (imp.module, alias.name)
                for imp in ast.walk(ours) if isinstance(imp, ast.ImportFrom) and imp.module
                and imp.module.startswith("vllm") for alias in imp.names}
    found = []
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in imported:
            module_name, class_name = imported[base.id]
            module = tree.module(module_name)
            cls = find_class(module, class_name) if module is not None else None
            if cls is not None:
                found.append((module_name, cls))
    return found


def check(tree: Tree, integration: Path = INTEGRATION) -> Report:
    """What in kvswap's vLLM integration would break on the vLLM of ``tree``."""
    report = Report(tree.version)
    declared: set[str] = set()  # every method of the vLLM base classes kvswap extends
    sources = {path: ast.parse(path.read_text()) for path in sorted(integration.glob("*.py"))}
    for path, module in sources.items():
        for node in module.body:
            if not isinstance(node, ast.ClassDef):
                continue
            ours = methods(node)
            for module_name, base in _vllm_bases(tree, module, node):
                theirs = methods(base)
                declared.update(theirs)
                where = f"{path.name}: {node.name} ({module_name}.{base.name})"
                for name, method in theirs.items():
                    if method.abstract and name not in ours:
                        report.problems.append(f"{where}: abstract {name}() is not implemented")
                    elif name in ours:
                        why = compatible(ours[name], method)
                        if why:
                            report.problems.append(f"{where}: {name}() {why}")
                    elif not name.startswith("_"):
                        report.defaults.append(f"{node.name}.{name}")
    for path, module in sources.items():
        for function, node in _imports(module):
            if function is not None and function not in declared and function.startswith(_HOOK_PREFIXES):
                continue  # a hook this version does not declare: never called there
            for alias in node.names:
                problem = _import_problem(tree, node.module or "", alias.name)
                if problem:
                    report.problems.append(f"{path.name}: from {node.module} import {alias.name}: {problem}")
    return report


_HOOK_PREFIXES = ("get_", "supports_", "may_", "kv_cache_", "requires_", "finish_", "restore_", "unregister_",
                  "request_finished_all_groups")


def _imports(module: ast.Module) -> Iterator[tuple[str | None, ast.ImportFrom]]:
    """``from vllm...`` imports with the name of the method or function they sit in (None at top level)."""
    seen: set[int] = set()
    for node in module.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
            yield None, node
        for inner in ast.walk(node) if isinstance(node, ast.ClassDef | ast.FunctionDef) else ():
            if isinstance(inner, ast.FunctionDef):
                for imp in ast.walk(inner):
                    if isinstance(imp, ast.ImportFrom) and (imp.module or "").startswith("vllm") \
                            and id(imp) not in seen:
                        seen.add(id(imp))
                        yield inner.name, imp


def _import_problem(tree: Tree, module_name: str, name: str) -> str | None:
    module = tree.module(module_name)
    if module is None:
        return "no such module"
    return None if _defines(tree, module_name, name, depth=4) else "not defined there"


def _defines(tree: Tree, module_name: str, name: str, depth: int) -> bool:
    """Whether ``module_name`` binds ``name``: itself, as a submodule, or through ``import *``."""
    module = tree.module(module_name)
    if module is None:
        return False
    if name in defined_names(module) or tree.module(f"{module_name}.{name}") is not None:
        return True
    package = module_name if tree.is_package(module_name) else module_name.rpartition(".")[0]
    for node in _top_level(module.body):
        if depth and isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            parent = package
            for _ in range(max(0, node.level - 1)):
                parent = parent.rpartition(".")[0]
            source = f"{parent}.{node.module}" if node.level and node.module else parent if node.level \
                else node.module or ""
            if _defines(tree, source, name, depth - 1):
                return True
    return False
