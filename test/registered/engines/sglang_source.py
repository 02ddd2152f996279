"""SGLang's own definitions, read from the installed package's source with `ast` (importing them needs its GPU
stack): request dataclasses (sglang.srt.managers.io_struct), the HTTP routes and the request type each takes
(sglang.srt.entrypoints.http_server), the sampling parameters (sglang.srt.sampling.sampling_params) and the
server arguments (ServerArgs.add_cli_args in sglang.srt.server_args, rebuilt as an argparse parser)."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PIN_FILE = REPO / "requirements" / "constraints-cuda.txt"


def pinned_version() -> str:
    for line in PIN_FILE.read_text().splitlines():
        if line.strip().startswith("sglang=="):
            return line.strip().removeprefix("sglang==")
    raise AssertionError(f"{PIN_FILE}: no sglang==X line")


def installed_root() -> tuple[Path | None, str]:
    """(the installed sglang folder, why not) without importing sglang."""
    pin = pinned_version()
    install = f"pip install --no-deps 'sglang=={pin}' (or scripts/setup.sh)"
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None, f"sglang is not installed: {install}"
    version = importlib.metadata.version("sglang")
    if version != pin:
        return None, f"sglang {version} is installed but {PIN_FILE.name} pins {pin}: {install}"
    return Path(list(spec.submodule_search_locations)[0]), ""


def _tree(root: Path, relative: str) -> ast.Module:
    return ast.parse((root / relative).read_text())


@dataclass(frozen=True)
class RequestType:
    name: str
    fields: dict[str, bool]  # field -> required (no default)
    literals: dict[str, tuple]  # field -> allowed values, for Literal[...] annotations


def _literal_values(annotation: ast.expr) -> tuple | None:
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "Literal":
        items = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        return tuple(ast.literal_eval(item) for item in items)
    return None


def request_types(root: Path) -> dict[str, RequestType]:
    """Every dataclass of io_struct with its own and its bases' fields (BaseReq's kw-only rid included)."""
    classes = {
        node.name: node for node in _tree(root, "srt/managers/io_struct.py").body if isinstance(node, ast.ClassDef)
    }

    def collect(name: str) -> tuple[dict[str, bool], dict[str, tuple]]:
        node = classes.get(name)
        if node is None:
            return {}, {}
        fields: dict[str, bool] = {}
        literals: dict[str, tuple] = {}
        for base in node.bases:
            base_fields, base_literals = collect(getattr(base, "id", ""))
            fields.update(base_fields)
            literals.update(base_literals)
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                if getattr(statement.annotation, "id", None) == "ClassVar":
                    continue
                fields[statement.target.id] = statement.value is None
                values = _literal_values(statement.annotation)
                if values is not None:
                    literals[statement.target.id] = values
        return fields, literals

    return {name: RequestType(name, *collect(name)) for name in classes}


def accepts(request: RequestType, body: dict) -> list[str]:
    """Problems SGLang's parsing of `body` into `request` would have ([] = accepted as sent)."""
    problems = [f"{request.name} has no field {key!r}" for key in body if key not in request.fields]
    problems += [
        f"{request.name} requires {key!r}" for key, required in request.fields.items() if required and key not in body
    ]
    for key, allowed in request.literals.items():
        if key in body and body[key] not in allowed:
            problems.append(f"{request.name}.{key} must be one of {allowed}, got {body[key]!r}")
    return problems


@dataclass(frozen=True)
class Route:
    path: str
    methods: tuple[str, ...]
    request_type: str | None  # the dataclass its body is parsed into (None: no body)


def routes(root: Path) -> dict[str, Route]:
    found: dict[str, Route] = {}
    for node in ast.walk(_tree(root, "srt/entrypoints/http_server.py")):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body_type = next(
            (
                a.annotation.id
                for a in node.args.args
                if isinstance(a.annotation, ast.Name) and a.annotation.id.endswith(("Input", "Req"))
            ),
            None,
        )
        for decorator in node.decorator_list:
            if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)):
                continue
            verb = decorator.func.attr
            if verb not in ("get", "post", "put", "api_route") or not decorator.args:
                continue
            if not isinstance(decorator.args[0], ast.Constant):
                continue
            path = decorator.args[0].value
            methods: tuple[str, ...] = (verb.upper(),)
            for keyword in decorator.keywords:
                if keyword.arg == "methods":
                    methods = tuple(ast.literal_eval(keyword.value))
            previous = found.get(path)
            found[path] = Route(path, (previous.methods if previous else ()) + methods, body_type)
    return found


def sampling_param_names(root: Path) -> set[str]:
    for node in ast.walk(_tree(root, "srt/sampling/sampling_params.py")):
        if isinstance(node, ast.ClassDef) and node.name == "SamplingParams":
            init = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            return {a.arg for a in init.args.args[1:]} | {a.arg for a in init.args.kwonlyargs}
    raise AssertionError("sglang.srt.sampling.sampling_params has no SamplingParams")


_TYPES = {"int": int, "float": float, "str": str}


def server_args_parser(root: Path) -> argparse.ArgumentParser:
    """ServerArgs.add_cli_args's options as an argparse parser: names, flag-or-value, literal types and choices."""
    parser = argparse.ArgumentParser(prog="sglang.launch_server", add_help=False)
    for node in ast.walk(_tree(root, "srt/server_args.py")):
        if not (isinstance(node, ast.FunctionDef) and node.name == "add_cli_args"):
            continue
        for call in ast.walk(node):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "add_argument"):
                continue
            names = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if not names or not names[0].startswith("-"):
                continue
            keywords = {k.arg: k.value for k in call.keywords if k.arg}
            action = keywords.get("action")
            action = action.value if isinstance(action, ast.Constant) else None
            options: dict = {"required": False}
            if isinstance(keywords.get("dest"), ast.Constant):
                options["dest"] = keywords["dest"].value
            if action in ("store_true", "store_false"):
                options["action"] = action
            else:
                kind = keywords.get("type")
                options["type"] = _TYPES.get(getattr(kind, "id", ""), str)
                if isinstance(keywords.get("nargs"), ast.Constant):
                    options["nargs"] = keywords["nargs"].value
                try:
                    options["choices"] = list(ast.literal_eval(keywords["choices"])) if "choices" in keywords else None
                except ValueError:  # choices computed at run time: not checked here
                    options["choices"] = None
            if "required" in keywords and isinstance(keywords["required"], ast.Constant):
                options["required"] = keywords["required"].value
            parser.add_argument(*names, **options)
        return parser
    raise AssertionError("sglang.srt.server_args has no add_cli_args")


def unpickler_rules(root: Path) -> tuple[set[str], set[tuple[str, str]]]:
    """(ALLOWED_MODULE_PREFIXES, DENY_CLASSES) of SGLang's SafeUnpickler, which reads serialized_named_tensors."""
    for node in ast.walk(_tree(root, "srt/utils/common.py")):
        if isinstance(node, ast.ClassDef) and node.name == "SafeUnpickler":
            values = {
                target.id: ast.literal_eval(statement.value)
                for statement in node.body
                if isinstance(statement, ast.Assign)
                for target in statement.targets
                if isinstance(target, ast.Name)
            }
            return set(values["ALLOWED_MODULE_PREFIXES"]), set(values["DENY_CLASSES"])
    raise AssertionError("sglang.srt.utils.common has no SafeUnpickler")


def dataclass_fields(root: Path, relative: str, name: str) -> list[str]:
    for node in _tree(root, relative).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    raise AssertionError(f"{relative} has no class {name}")
