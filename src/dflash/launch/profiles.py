"""`dflash install-profiles`: link this checkout's Snakemake profiles where `snakemake --profile NAME` looks."""

from __future__ import annotations

from pathlib import Path

PROFILES_DIR = Path("workflow/profiles")


def snakemake_config_dir() -> Path:
    """Where `snakemake --profile NAME` looks for NAME after ./NAME (the same rule Snakemake uses)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("snakemake", "snakemake"))


def install_profiles(dest: Path | None = None, profiles_dir: Path = PROFILES_DIR) -> list[str]:
    """Link each profile of this checkout (workflow/profiles/NAME) as DEST/NAME, so `--profile NAME` finds it.

    An existing link is repointed; an existing file or directory (a profile of the user's own) is left alone and
    reported in the returned lines."""
    dest = Path(dest) if dest is not None else snakemake_config_dir()
    profiles = sorted(p for p in Path(profiles_dir).iterdir() if (p / "config.yaml").is_file())
    if not profiles:
        raise FileNotFoundError(f"no profiles (NAME/config.yaml) under {profiles_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for src in profiles:
        link = dest / src.name
        target = src.resolve()
        if link.is_symlink():
            if link.resolve() == target:
                done.append(f"{link} -> {target} (unchanged)")
                continue
            link.unlink()
        elif link.exists():
            done.append(f"{link} exists and is not a link, left alone: use `snakemake --profile {src}` "
                        f"(or move {link} away and run this again)")
            continue
        link.symlink_to(target, target_is_directory=True)
        done.append(f"{link} -> {target}")
    return done
