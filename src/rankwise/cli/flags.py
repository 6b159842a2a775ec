"""`compress`'s recipe flags, made from the Recipe's fields: one place to add an option.

Every scalar field (str, int, float, bool, a Literal, an optional of those, or a list of str
given comma-separated) is a flag `--field-name` (a bool `--x/--no-x`) whose help is the field's
`description`, a Literal's choices appended. Each defaults to None, so a flag left out keeps
the value from `--recipe r.yaml`. A Literal is read as its base type and checked by the Recipe,
so a bad choice is the same one-line RecipeError as a bad value in a file. A field that no flag
can carry is declared in YAML_ONLY (docs/recipe.md says so); NESTED names the fields of a
nested model that are flags all the same (`--recover-steps`).

typer reads a command's parameters with `inspect.signature` and `typing.get_type_hints`, so
`recipe_command` gives the command function a `__signature__` (its own parameters, then one
keyword-only `Annotated[T | None, typer.Option(...)]` per flag) and the matching
`__annotations__`; the flags' values reach the function's `**flags`.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.markup import escape

from rankwise.core.recipe import Recipe

# Fields no flag carries: lists of objects and recovery's finer settings (the `recover` command
# has flags for most of those). docs/recipe.md marks them "YAML only".
YAML_ONLY = ("overrides", "recover")
# Fields of a nested model that are flags: `--recover-steps`, `--recover-lr`.
NESTED = {"recover": ("steps", "lr")}
# Fields the command spells as its own parameters (the positional MODEL), not generated.
SPELLED = ("model",)
PANEL = "Recipe (docs/recipe.md; unset flags keep --recipe's values)"

F = TypeVar("F", bound=Callable[..., Any])


def split(value: str | None) -> list[str] | None:
    """A comma-separated flag as a list (None when unset or empty: the recipe's value stays)."""
    return [part for part in value.split(",") if part] if value else None


@dataclass(frozen=True)
class Flag:
    """One recipe field as a command parameter."""

    name: str  # the parameter: the field's name, `recover_steps` for a nested one
    path: tuple[str, ...]  # where the value goes: ("ratio",) or ("recover", "steps")
    kind: type  # str, int, float or bool: what the command line gives
    choices: tuple[object, ...]  # a Literal's values, else ()
    comma_separated: bool  # a list of str
    description: str
    default: object  # the recipe's, shown in the help

    def parameter(self) -> inspect.Parameter:
        dashed = self.name.replace("_", "-")
        decls = (f"--{dashed}/--no-{dashed}",) if self.kind is bool else (f"--{dashed}",)
        text = self.description
        if self.choices:
            text = " | ".join(str(choice) for choice in self.choices) + f": {text}"
        if self.comma_separated:
            text += " (comma-separated)"
        shown: bool | str = False  # the recipe's default (the option's own is None: unset)
        if self.kind is bool:
            shown = dashed if self.default else f"no-{dashed}"
        elif self.default not in (None, []):
            shown = str(self.default)
        option = typer.Option(*decls, help=escape(text), show_default=shown, rich_help_panel=PANEL)
        annotation = Annotated[self.kind | None, option]
        return inspect.Parameter(
            self.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
        )


def _flag_type(annotation: object) -> tuple[type, tuple[object, ...], bool] | None:
    """(type read from the command line, Literal choices, comma-separated) or None: no flag."""
    if get_origin(annotation) in (Union, types.UnionType):  # an optional: its one other type
        others = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(others) != 1:
            return None
        annotation = others[0]
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        kinds = {type(choice) for choice in choices}
        return (kinds.pop(), choices, False) if kinds in ({str}, {int}, {float}) else None
    if get_origin(annotation) is list and get_args(annotation) == (str,):
        return str, (), True
    return (annotation, (), False) if annotation in (str, int, float, bool) else None


def _flag(name: str, path: tuple[str, ...], field: FieldInfo, owner: str) -> Flag:
    found = _flag_type(field.annotation)
    if found is None:
        raise TypeError(
            f"{owner}.{path[-1]} ({field.annotation}) cannot be a flag: add it to YAML_ONLY in "
            "cli/flags.py and mark it 'YAML only' in docs/recipe.md"
        )
    kind, choices, comma_separated = found
    default = field.get_default(call_default_factory=True)
    return Flag(name, path, kind, choices, comma_separated, field.description or "", default)


def recipe_flags(recipe_cls: type[Recipe] = Recipe) -> list[Flag]:
    """The flags of `recipe_cls`'s fields, in the order the fields are declared."""
    flags = []
    for name, field in recipe_cls.model_fields.items():
        for sub in NESTED.get(name, ()):
            nested = typing.cast(type[BaseModel], field.annotation)
            owner = nested.__name__
            flags.append(_flag(f"{name}_{sub}", (name, sub), nested.model_fields[sub], owner))
        if name not in YAML_ONLY and name not in SPELLED:
            flags.append(_flag(name, (name,), field, recipe_cls.__name__))
    return flags


def recipe_command(recipe_cls: type[Recipe] = Recipe) -> Callable[[F], F]:
    """Decorator: the command function's own parameters, then one option per recipe flag.

    The function takes `**flags` (the flags' values, None where unset) and turns them into a
    recipe with `recipe_from_flags`."""

    def decorate(func: F) -> F:
        hints = typing.get_type_hints(func, include_extras=True)  # the module's names resolved
        signature = inspect.signature(func).parameters.values()
        if not any(param.kind is inspect.Parameter.VAR_KEYWORD for param in signature):
            raise TypeError(f"{func.__name__} must take **flags: the recipe flags' values")
        own = [
            param.replace(annotation=hints[param.name])
            for param in signature
            if param.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        flags = [flag.parameter() for flag in recipe_flags(recipe_cls)]
        clashes = {param.name for param in own} & {param.name for param in flags}
        if clashes:
            raise TypeError(f"{func.__name__} spells recipe flags itself: {sorted(clashes)}")
        params = [*own, *flags]
        func.__signature__ = inspect.Signature(params, return_annotation=None)
        func.__annotations__ = {param.name: param.annotation for param in params}
        func.__annotations__["return"] = None
        return func

    return decorate


def recipe_from_flags(base: Recipe, values: dict[str, Any], **spelled: object) -> Recipe:
    """`base` with the flags that were given (and the spelled fields, e.g. model) applied."""
    flags = recipe_flags(type(base))
    unknown = set(values) - {flag.name for flag in flags}
    if unknown:
        raise TypeError(f"not recipe flags: {sorted(unknown)}")
    changes: dict[str, Any] = dict(spelled)
    for flag in flags:
        value = values.get(flag.name)
        if flag.comma_separated:
            value = split(value)
        if len(flag.path) == 2:
            changes.setdefault(flag.path[0], {})[flag.path[1]] = value
        else:
            changes[flag.name] = value
    return base.merged(**changes)
