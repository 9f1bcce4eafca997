"""Every place allconv replaces a private name of Hydra: its writes into run and sweep folders.

Hydra writes a job's `.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml` (hydra.core.utils._save_config,
called by run_job) and the sweep's `multirun.yaml` (the basic sweeper's OmegaConf.save) with open(path, "w"):
through a symbolic link (a resumed run truncated a file outside its folder) and in place (a kill leaves half a
file, which the next relaunch reads as the run's config). install() makes both go through files.write_atomic:
the whole file or nothing, a link at the name replaced, never followed; a `.hydra` folder that is a link is
replaced by a real folder (the folder it pointed to is left as it was). Called by allconv.cli.setup(), which
every process that runs a job calls (the entry points; a launcher's worker unpickling the pre-flight
callback), and again by the pre-flight before a sweep starts: Hydra's plugin scan executes the sweeper's
module anew, which restores its own OmegaConf there. tests/test_run_folder_model.py fails when Hydra renames
these names; pyproject.toml pins hydra-core to the range tested (1.3.x).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _save_config(cfg: DictConfig, filename: str, output_dir: Path) -> None:
    from allconv.files import write_atomic

    output_dir = Path(output_dir)
    if output_dir.is_symlink():
        output_dir.unlink()  # the link only; what it pointed to stays as it was
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / filename, OmegaConf.to_yaml(cfg).encode())


class _SweeperOmegaConf:
    """OmegaConf as the basic sweeper sees it, with save() atomic (the sweeper calls nothing else of it)."""

    def __getattr__(self, name):
        return getattr(OmegaConf, name)

    @staticmethod
    def save(config, f, resolve: bool = False) -> None:
        from allconv.files import write_atomic

        write_atomic(Path(f), OmegaConf.to_yaml(config, resolve=resolve).encode())


def install() -> None:
    from hydra._internal.core_plugins import basic_sweeper
    from hydra.core import utils

    utils._save_config = _save_config  # run_job calls it by this module-level name
    basic_sweeper.OmegaConf = _SweeperOmegaConf()
