"""A study: rows (variants of a base config) x training seeds, trained and evaluated with one protocol.

A study file (``configs/studies/*.yaml``)::

    name: seed_ablation_quick
    config: configs/quickstart.yaml        # the base of every row
    seeds: [0, 1, 2]                       # training seeds: the unit of replication
    baseline: MOTFM                        # the row the difference table compares with
    evaluation: {num_samples: 40, split: test, noise_seed: 0, num_steps: 10}
    rows:
      - {name: MOTFM, set: [prior_args.alpha=0, contrastive_args.weight=0]}
      - {name: COMET}
      - {name: SPADE, config: configs/spade_quickstart.yaml}   # a row may start from another base

Every row is trained once per seed (``train_args.seed``) and evaluated on the same masks and noise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from utils.config import ConfigError, RunConfig, build_dataclass, read_yaml_mapping
from utils.methods import load_config


@dataclass(frozen=True)
class RowSpec:
    name: str
    config: str = ""  # default: the study's config
    set: tuple[str, ...] = ()  # --set overrides on top of the config
    # Evaluate the runs of an earlier row instead of training new ones (e.g. the same model at other steps).
    runs_of: str = ""
    num_steps: int = 0  # sampler steps at evaluation; 0 = the study's evaluation.num_steps

    def check(self, key):
        if not self.name.strip():
            raise ConfigError(f"{key('name')} must not be empty")
        if self.runs_of and (self.config or self.set):
            raise ConfigError(f"{key('runs_of')} evaluates another row's runs: give no config or set of its own")
        if self.num_steps < 0:
            raise ConfigError(f"{key('num_steps')} must be >= 0, got {self.num_steps}")


@dataclass(frozen=True)
class EvaluationSpec:
    num_samples: int = 2000  # in all: samples_per_mask for each of the split's first num_samples / K masks
    samples_per_mask: int = 4  # K distinct noises per mask: per-mask diversity and the mean-of-K row
    split: str = "test"
    noise_seed: int = 0  # the noise of sample i is that of (noise_seed, i), in every row and seed
    num_steps: int = 10  # steps of each row's own sampler (a one-pass generator ignores them)
    n_boot: int = 1000  # for the per-run cluster-bootstrap intervals evaluate.py writes
    # evaluate.py --segmenter: "" = no mask fidelity; "auto" (trained once per dataset, cached) or a segmenter path.
    # With it the tables gain mask_dice: the segmenter's Dice against the conditioning mask, mean over labels.
    segmenter: str = ""

    def check(self, key):
        for name in ("num_samples", "num_steps", "n_boot", "samples_per_mask"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{key(name)} must be >= 1, got {getattr(self, name)}")
        if self.num_samples % self.samples_per_mask:
            raise ConfigError(f"{key('num_samples')} must be a multiple of {key('samples_per_mask')} "
                              f"({self.samples_per_mask}), got {self.num_samples}")


@dataclass(frozen=True)
class StudySpec:
    name: str
    config: str
    rows: tuple[RowSpec, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    baseline: str = ""  # default: the first row
    output_dir: str = "studies"
    description: str = ""
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)

    def check(self, key):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"{key('name')} must be letters, digits, '_', '.' or '-', got {self.name!r}")
        names = [r.name for r in self.rows]
        if not names:
            raise ConfigError(f"{key('rows')} must list at least one row")
        slugs = [slug(n) for n in names]
        if len(set(slugs)) != len(slugs):
            raise ConfigError(f"{key('rows')} names must differ (as directory names: {slugs})")
        for i, row in enumerate(self.rows):
            trained = [r.name for r in self.rows[:i] if not r.runs_of]
            if row.runs_of and row.runs_of not in trained:
                raise ConfigError(f"rows[{i}].runs_of must name an earlier row that trains ({trained}), "
                                  f"got {row.runs_of!r}")
        if self.baseline and self.baseline not in names:
            raise ConfigError(f"{key('baseline')} must be one of the rows {names}, got {self.baseline!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{key('seeds')} must be distinct training seeds, got {list(self.seeds)}")

    @property
    def baseline_row(self) -> str:
        return self.baseline or self.rows[0].name

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def trained_row(self, row: RowSpec) -> RowSpec:
        """The row whose runs ``row`` evaluates: itself, or the row named by its ``runs_of``."""
        return next(r for r in self.rows if r.name == row.runs_of) if row.runs_of else row

    def num_steps(self, row: RowSpec) -> int:
        return row.num_steps or self.evaluation.num_steps


def slug(name: str) -> str:
    """A row name as a directory name: '+ warm start' -> 'warm_start'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "row"


def load_study(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    """Read and validate a study file; each row's config is loaded too, so a bad row fails before any training."""
    from utils.config import apply_overrides

    values = apply_overrides(read_yaml_mapping(path), list(overrides))
    spec = build_dataclass(StudySpec, values, str(path))
    for seed in spec.seeds:
        for row in spec.rows:
            row_config(spec, row, seed)
    return spec


def run_name(row: RowSpec, seed: int) -> str:
    return f"{slug(row.name)}-seed{seed}"


def row_overrides(spec: StudySpec, row: RowSpec, seed: int) -> list[str]:
    """The ``--set`` items that make ``row`` with training ``seed`` from its config, its run under ``<study>/runs/``."""
    row = spec.trained_row(row)
    return [*row.set, f"train_args.seed={seed}", f"run_name={run_name(row, seed)}",
            f"output_dir={spec.study_dir / 'runs'}"]


def row_config(spec: StudySpec, row: RowSpec, seed: int) -> RunConfig:
    """The resolved config of ``row`` trained with ``seed``."""
    try:
        return load_config(spec.trained_row(row).config or spec.config, row_overrides(spec, row, seed))
    except ConfigError as e:
        raise ConfigError(f"study {spec.name}, row '{row.name}': {e}") from None
