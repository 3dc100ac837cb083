"""Reading a port's source for the line behind a value: where a module's constant, a
torch module's option, an optimizer's setting or a loop comes from in the user's files.

:mod:`.localise` and :mod:`.pins` find *which* op, module or setting is wrong from what
the port computes; the functions here turn that into a line of its source, by ``ast``
and ``inspect`` on the user's files (heuristics on the source, each naming what it reads):

* a float a line reads (:func:`float_attributes`, :func:`float_methods`) and where it was
  set (:func:`attribute_site`: a constructor's default, a class body, a config's field;
  :func:`method_site`: the ``return`` of the method giving it);
* a torch module built with an option that is not GPT-2's (:func:`changed_options`,
  :func:`option_site`, :func:`constructor_site`);
* an optimizer's call and its parameter groups (:func:`_call_at`, :func:`_group_lines`);
* the ``for`` loop holding a line (:func:`_loop_header`).
"""
from __future__ import annotations

import ast
import inspect
import linecache
import math
import re
import sys
import textwrap

import numpy as np

from .record import Site, is_user_file


def _loop_header(site: Site) -> Site | None:
    """The header line of the innermost ``for`` loop whose body holds ``site``'s line, in
    the function holding it; None where the line is in no loop."""
    try:
        tree = ast.parse("".join(linecache.getlines(site.file)))
    except SyntaxError:
        return None
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.For) and n.body
             and n.body[0].lineno <= site.line <= n.body[-1].end_lineno]
    if not loops:
        return None
    return _line(site.file, max(loops, key=lambda n: n.lineno).lineno)


# torch's modules -> the options of their constructor that change what they compute or
# their gradient (a padding row that gets none, a gain or bias left out, a GELU's form)
_OPTIONS = {"Embedding": ("padding_idx", "max_norm", "scale_grad_by_freq", "sparse"),
            "LayerNorm": ("eps", "elementwise_affine", "bias"), "Linear": ("bias",), "GELU": ("approximate",)}
# where GPT-2's setting is not torch's default: the tanh GELU
_GPT2 = {("GELU", "approximate"): "tanh"}


def changed_options(module) -> tuple[type | None, dict]:
    """(the torch class of ``module`` that has options of :data:`_OPTIONS`, {option: its
    setting} for those not at GPT-2's setting, the constructor's default but where
    :data:`_GPT2` says): ``padding_idx=0`` on an ``nn.Embedding``, ``bias=False`` on a
    ``Linear`` (read as whether it holds a bias), ``eps=1e-3``, an ``nn.GELU()`` (erf)."""
    import torch
    base = next((k for k in type(module).__mro__ if k.__name__ in _OPTIONS
                 and k.__module__.startswith("torch.") and issubclass(k, torch.nn.Module)), None)
    if base is None:
        return None, {}
    params = inspect.signature(base.__init__).parameters
    out = {}
    for name in _OPTIONS[base.__name__]:
        if name not in params or not hasattr(module, name):
            continue
        value = getattr(module, name)
        default = _GPT2.get((base.__name__, name), params[name].default)
        if isinstance(default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None       # bias: held or not
        if isinstance(default, float) and isinstance(value, float):
            if not math.isclose(value, default, rel_tol=1e-6):
                out[name] = value
        elif value != default:
            out[name] = value
    return base, out


def option_site(model, wanted: set) -> tuple[Site, str] | None:
    """(the line, the words) of the constructor call, in the user's source, of a torch
    module holding one of the ``wanted`` parameters (``id``s) built with an option that
    changes its gradient or output (:func:`changed_options`); None where none is."""
    for name, module in model.named_modules():
        if not any(id(p) in wanted for p in module.parameters(recurse=False)):
            continue
        base, options = changed_options(module)
        if options:
            site = constructor_site(model, name, base, options)
            if site is not None:
                said = ", ".join(f"{k}={v!r}" for k, v in options.items())
                return site, f"{name} is built with {said}: not GPT-2's {base.__name__}"
    return None


def constructor_site(model, name: str, base: type, options: dict) -> Site | None:
    """The line, in the user's files, of the call constructing ``model``'s module ``name``
    (a ``base`` torch module) with ``options`` set: the calls of its class's name (or a
    ``super().__init__`` in its class) whose arguments, bound to ``base``'s signature, set
    one of them (to that value where it is a constant), or leave to torch's default one
    whose GPT-2 setting is not it (:func:`_option_line`); of those, the call whose result
    is assigned under the module's own name first (``self.gelu = nn.GELU()``,
    ``wpe=nn.Embedding(...)``), then those in the classes of the module's owners (the most
    derived, the innermost owner first: the subclass whose method makes it). A heuristic
    on the source (``ast``), as the optimizer's call is found."""
    modules = dict(model.named_modules())
    mro = type(modules[name]).__mro__
    kinds = {k.__name__ for k in mro[:mro.index(base) + 1]}
    owners, at = [k for k in mro[:mro.index(base)]], name
    while at:
        at = at.rpartition(".")[0]
        owners.extend(k for k in type(modules[at]).__mro__ if k not in owners)
    # the owners' files, and those of the functions their classes hold (a factory given as a
    # class attribute: ``norm = make_norm``)
    held = [getattr(v, "__func__", v) for k in owners for v in vars(k).values()]
    files = {f for f in [getattr(sys.modules.get(k.__module__), "__file__", None) for k in owners]
             + [getattr(getattr(v, "__code__", None), "co_filename", None) for v in held] if f and is_user_file(f)}
    found = []
    for file in sorted(files):
        for klass, assigned, call in _calls_in(file, kinds):
            line = _option_line(call, base, options)
            if line is not None:
                rank = next((i for i, k in enumerate(owners) if k.__name__ == klass
                             and getattr(sys.modules.get(k.__module__), "__file__", None) == file), len(owners))
                found.append((assigned != name.rpartition(".")[2], rank, file, line))
    if not found:
        return None
    *_, file, line = min(found)
    return _line(file, line)


def _calls_in(file: str, kinds: set):
    """(the enclosing class's name or None, the name its result is given or None, the
    call) for each call in ``file`` of a name in ``kinds`` (``nn.Embedding(...)``,
    ``Embedding(...)``), or of ``super().__init__`` in a class of that name."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    names = _assigned_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        inner = [c for c in classes if c.lineno <= node.lineno <= c.end_lineno]
        klass = max(inner, key=lambda c: c.lineno).name if inner else None
        f = node.func
        called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        init = (called == "__init__" and isinstance(f.value, ast.Call) and isinstance(f.value.func, ast.Name)
                and f.value.func.id == "super" and klass in kinds)
        if called in kinds or init:
            yield klass, names.get(id(node)), node


def _assigned_names(tree) -> dict[int, str]:
    """{id of a call: the name it is assigned to}: ``self.x = call``, ``x = call``, element by
    element of a tuple assigned to a tuple, ``x=call`` as a keyword, ``"x": call`` in a dict."""
    out = {}

    def name_of(t):
        return t.attr if isinstance(t, ast.Attribute) else t.id if isinstance(t, ast.Name) else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Tuple) and isinstance(node.value, ast.Tuple) and len(t.elts) == len(node.value.elts):
                    out.update({id(v): name_of(e) for e, v in zip(t.elts, node.value.elts)})
                else:
                    out[id(node.value)] = name_of(t)
        elif isinstance(node, ast.keyword) and node.arg:
            out[id(node.value)] = node.arg
        elif isinstance(node, ast.Dict):
            out.update({id(v): k.value for k, v in zip(node.keys, node.values)
                        if isinstance(k, ast.Constant) and isinstance(k.value, str)})
    return out


def _option_line(call: ast.Call, base: type, options: dict) -> int | None:
    """The line of ``call``'s argument setting one of ``options`` (bound to ``base``'s
    signature), where it is not a constant other than the option's setting; else the
    call's last line where it leaves one to torch's default and that default is the
    option's setting (not GPT-2's: ``nn.GELU()``); None."""
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return None
    try:
        bound = inspect.signature(base).bind(*call.args, **{k.arg: k.value for k in call.keywords})
    except TypeError:
        return None
    params = inspect.signature(base).parameters
    for option, value in options.items():
        node = bound.arguments.get(option)
        if node is None:
            if option in params and params[option].default == value:
                return call.end_lineno
            continue
        if isinstance(node, ast.Constant) and node.value != value and not (
                isinstance(value, bool) and node.value is None and value is False):
            continue
        return node.lineno
    return None


def _group_lines(file: str, line: int, settings) -> dict[str, int]:
    """{setting: the line of a parameter group's dict literal (``{"params": ...,
    "weight_decay": 0.0}``) that sets it}, in the function of ``file`` whose call at
    ``line`` constructs the optimizer: a group's own setting overrides the constructor's
    keyword, so a differing one lives there."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return {}
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
           and n.lineno <= line <= n.end_lineno]
    if not fns:
        return {}
    fn = max(fns, key=lambda n: n.lineno)      # the innermost
    out: dict[str, int] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "params" for k in node.keys):
            for k in node.keys:
                if isinstance(k, ast.Constant) and k.value in settings and k.value not in out:
                    out[k.value] = k.lineno
    return out


def given_for_groups(file: str, line: int, caller) -> Site | None:
    """The line where the caller (``caller``: (file, the call's positions)) of the function
    of ``file`` holding ``line`` (an optimizer factory) passes an argument for a parameter
    with a default that the function's parameter-group dicts read (``decay=lambda ...``
    for ``{"params": [q for n, q in named if decay(n, q)], ...}``): the groups are split by
    what the caller gives, so a group's differing setting comes from there; None where the
    caller leaves them all to their defaults."""
    if caller is None:
        return None
    fn = _function_at(file, line)
    cfile, (cline, cend, ccol, cend_col) = caller
    call = _call_at(cfile, cline, ccol, cend, cend_col)
    if fn is None or call is None or isinstance(fn, ast.Lambda):
        return None
    args = fn.args.posonlyargs + fn.args.args
    defaulted = {a.arg for a in args[len(args) - len(fn.args.defaults):]} | {
        a.arg for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults) if d is not None}
    read = {n.id for d in ast.walk(fn) if isinstance(d, ast.Dict) and any(
        isinstance(k, ast.Constant) and k.value == "params" for k in d.keys) for n in ast.walk(d)
        if isinstance(n, ast.Name)}
    for k in call.keywords:
        if k.arg in defaulted & read:
            return _line(cfile, k.value.lineno)
    for a, node in zip(args, call.args):
        if a.arg in defaulted & read:
            return _line(cfile, node.lineno)
    return None


def _function_at(file: str, line: int):
    """The innermost function of ``file`` whose body holds ``line``; None."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return None
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
           and n.lineno <= line <= n.end_lineno]
    return max(fns, key=lambda n: n.lineno) if fns else None


def _line(file: str, n: int) -> Site:
    return Site(file, n, linecache.getline(file, n).strip())


def _call_at(file: str, line: int, col, end: int, end_col) -> ast.Call | None:
    """The call expression of ``file`` at those positions (the innermost one spanning them)."""
    try:
        tree = ast.parse("".join(linecache.getlines(file)))
    except SyntaxError:
        return None
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.lineno <= line and n.end_lineno >= end]
    exact = [n for n in calls if (n.lineno, n.col_offset, n.end_lineno, n.end_col_offset) == (line, col, end, end_col)]
    pool = exact or calls
    return min(pool, key=lambda n: (n.end_lineno - n.lineno, n.end_col_offset - n.col_offset)) if pool else None


# ----------------------------------------------------------------------------- a module's attribute

def float_attributes(owner, text: str) -> list[tuple[str, float]]:
    """The float attributes of ``owner`` (a module) that a line of its source reads as
    ``self.<name>``: [(name, value)]."""
    out = []
    for name in dict.fromkeys(re.findall(r"\bself\.(\w+)\b(?!\s*\()", text)):
        value = getattr(owner, name, None)
        if isinstance(value, float):
            out.append((name, value))
    return out


def float_methods(owner, text: str) -> list[tuple[str, float]]:
    """The methods of ``owner`` (a module), defined in the user's files, that a line of its
    source calls with no argument (``self.<name>()``) and that return a float:
    [(name, value)]. Each is called once more to read its value (a method of no argument
    whose result the line uses: a scale, an eps)."""
    import torch
    out = []
    for name in dict.fromkeys(re.findall(r"\bself\.(\w+)\(\s*\)", text)):
        method = getattr(owner, name, None)
        fn = getattr(method, "__func__", None)
        if fn is None or not hasattr(fn, "__code__") or not is_user_file(fn.__code__.co_filename):
            continue
        try:
            with torch.no_grad():
                value = method()
        except Exception:
            continue
        if isinstance(value, (float, int)) and not isinstance(value, bool):
            out.append((name, float(value)))
    return out


def method_site(owner, name: str) -> Site | None:
    """The line of ``owner``'s method ``name`` that returns its value: its one ``return``
    (the def's line where it has several, or none)."""
    fn = getattr(getattr(owner, name, None), "__func__", None)
    try:
        lines, start = inspect.getsourcelines(fn)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return None
    returns = [n for n in ast.walk(tree.body[0]) if isinstance(n, ast.Return)]
    at = returns[0].lineno if len(returns) == 1 else tree.body[0].lineno
    return _line(fn.__code__.co_filename, start + at - 1)


def config_site(model, name: str, value: float) -> Site | None:
    """Where a value a module was given by its caller comes from: a class-level field of
    a config object the model's modules hold (a dataclass's ``norm_eps: float = 1e-6``,
    the most derived class first) whose default is ``value``, a field whose name holds
    ``name`` first. A heuristic on the source, like :func:`attribute_site`."""
    import torch
    classes = []
    for module in model.modules():
        for obj in vars(module).values():
            if isinstance(obj, (torch.nn.Module, torch.Tensor, dict, list, tuple, str, int, float)) or obj is None:
                continue
            for klass in type(obj).__mro__:
                if klass not in classes and is_user_file(getattr(sys.modules.get(klass.__module__), "__file__", "")
                                                         or ""):
                    classes.append(klass)
    fields = [f for klass in classes for f in _class_constants(klass, value)]
    found = [(name not in field, i, site) for i, (field, site) in enumerate(fields)]
    if not found:
        return None
    return min(found)[2]


def _class_constants(klass, value: float):
    """(name, line) of each assignment in ``klass``'s body of a number equal to ``value``."""
    try:
        lines, start = inspect.getsourcelines(klass)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return
    for node in tree.body[0].body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        v = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, (int, float)) \
                and not isinstance(v.value, bool) and np.isclose(float(v.value), value, rtol=1e-9, atol=0):
            yield target.id, _line(inspect.getsourcefile(klass), start + node.lineno - 1)


def class_site(cls, name: str, value: float) -> Site | None:
    """The line of a class body in ``cls``'s MRO (the most derived first) that sets the
    class attribute ``name`` to ``value`` (``eps = 1e-3`` in a subclass); None where none
    does. A heuristic on the source, like :func:`attribute_site`."""
    klass = next((k for k in cls.__mro__ if name in vars(k)), None)
    # the most derived class setting it: where it sets another value, no line
    return next((site for field, site in _class_constants(klass, value) if field == name), None) if klass else None


def attribute_site(cls, name: str, value: float, model=None) -> Site | None:
    """Where the attribute ``name`` of ``cls``'s instances got ``value``: the parameter
    default equal to it in a constructor of ``cls``'s MRO (the most derived first: a
    subclass's ``eps=1e-12``), else a class body setting it (:func:`class_site`: ``eps =
    1e-3``), else (given the ``model``) a config's field holding it
    (:func:`config_site`: the value the caller passed), else the line of a constructor
    assigning ``self.<name>``. A heuristic on the source (``inspect`` and ``ast``)."""
    inits = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or not hasattr(init, "__code__") or not is_user_file(init.__code__.co_filename):
            continue
        try:
            lines, start = inspect.getsourcelines(init)
            tree = ast.parse(textwrap.dedent("".join(lines)))
        except (OSError, TypeError, SyntaxError):
            continue
        inits.append((init.__code__.co_filename, start, tree.body[0]))
    for file, start, fn in inits:
        for d in fn.args.defaults + [d for d in fn.args.kw_defaults if d is not None]:
            if isinstance(d, ast.Constant) and isinstance(d.value, (int, float)) and not isinstance(d.value, bool) \
                    and np.isclose(float(d.value), value, rtol=1e-9, atol=0):
                return _line(file, start + d.lineno - 1)
    site = class_site(cls, name, value) or (config_site(model, name, value) if model is not None else None)
    if site is not None:
        return site
    for file, start, fn in inits:
        for node in ast.walk(fn):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Attribute) and t.attr == name and isinstance(t.value, ast.Name)
                       and t.value.id == "self" for t in targets):
                    return _line(file, start + node.lineno - 1)
    return None


# ----------------------------------------------------------------------------- a helper's caller

def _int_constant(node) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int


def passes_int_to(caller: Site, lines: tuple[Site, ...]) -> bool:
    """Whether ``caller``'s line calls the function that holds every one of ``lines`` by
    name, with an int keyword argument (``dim=1``) for a parameter those lines read: the
    axis the helper works on chosen by its caller."""
    fns = [_function_at(s.file, s.line) for s in lines]
    if None in fns or len({(s.file, fn.lineno) for s, fn in zip(lines, fns)}) != 1:
        return False
    fn = fns[0]
    params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
    read = set()
    for s in lines:
        try:
            read |= {n.id for n in ast.walk(ast.parse(s.text)) if isinstance(n, ast.Name)}
        except SyntaxError:
            return False
    try:
        tree = ast.parse(caller.text)
    except SyntaxError:
        return False
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = getattr(call.func, "attr", getattr(call.func, "id", None))
        if name == getattr(fn, "name", None) and any(
                k.arg in params & read and _int_constant(k.value) for k in call.keywords):
            return True
    return False
