"""`rlvrx recipe show|validate|list`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from rlvrx.cli.common import console, err_console

app = typer.Typer(no_args_is_help=True)

RECIPE_ARG = typer.Argument(..., help="A recipe YAML file, or the name of a shipped recipe (see `rlvrx recipe list`).")
OVERRIDES_ARG = typer.Argument(None, help="Overrides as dotted KEY=VALUE, e.g. grpo.lr=1e-5 task.digits=3.", show_default=False)


@app.command()
def show(recipe: str = RECIPE_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied) as YAML."""
    from rlvrx.config import load_recipe, recipe_to_yaml

    resolved = load_recipe(recipe, overrides or [])
    console.print(recipe_to_yaml(resolved), end="", highlight=False, markup=False, soft_wrap=True)


@app.command()
def validate(recipe: str = RECIPE_ARG, overrides: Optional[List[str]] = OVERRIDES_ARG) -> None:
    """Check a recipe: exit 0 when valid, else print every error (with its dotted key) and exit 2."""
    from rlvrx.config import RecipeError, find_recipe, load_recipe

    try:
        resolved = load_recipe(recipe, overrides or [])
        errors = []
        if resolved.stages:
            from rlvrx.cli.pipeline import check_stages

            errors = check_stages(resolved)
    except RecipeError as exc:
        source, errors = exc.source, exc.errors
    else:
        source = str(find_recipe(recipe))
    if errors:
        err_console.print(f"[bold red]{source}[/]: {len(errors)} error(s)", highlight=False, soft_wrap=True)
        for line in errors:
            err_console.print(f"  - {line}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2)
    console.print(f"[green]ok[/] {find_recipe(recipe)}", highlight=False)


@app.command("list")
def list_() -> None:
    """List the recipes shipped in recipes/ with their one-line description."""
    from rlvrx.config import recipe_description, recipes_dirs

    table = Table("recipe", "description", "path")
    table.columns[0].no_wrap = True
    table.columns[1].overflow = table.columns[2].overflow = "fold"  # never cut short with an ellipsis
    cwd = Path.cwd().resolve()
    for directory in recipes_dirs():
        for path in sorted(directory.glob("*.y*ml")):
            shown = path.resolve().relative_to(cwd) if path.resolve().is_relative_to(cwd) else path
            table.add_row(path.stem, recipe_description(path), str(shown))
    console.print(table)
