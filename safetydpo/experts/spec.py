"""What an expert is: its name and folder, the pairs it trains on, the fingerprint that keys its outputs."""

from __future__ import annotations

from dataclasses import dataclass

from safetydpo import layout, storage
from safetydpo.categories import ALL, category_slug
from safetydpo.config import Config


class ExpertError(RuntimeError):
    """Bad pairs data or a failed expert; the message names the file, row, expert or step."""


def expert_slug(name: str) -> str:
    """Folder and run name of an expert: ``Illegal Activity`` -> ``illegal_activity``, ``all`` -> ``all``."""
    return ALL if name == ALL else category_slug(name)


def expert_dir(run_root: str, name: str) -> str:
    return layout.expert_dir(run_root, expert_slug(name))


def expert_categories(config: Config) -> list[str]:
    """``experts.categories``, else the categories the data selects."""
    if config.experts.categories is not None:
        return config.experts.selected_categories()
    return config.data.selected_categories()


def expert_names(config: Config) -> list[str]:
    """The experts ``config`` asks for: its categories, plus ``all`` when ``experts.include_all``."""
    return expert_categories(config) + ([ALL] if config.experts.include_all else [])


def lora_paths(config: Config) -> dict[str, str]:
    """The trained LoRA file of every configured expert that has finished (``expert.json`` present)."""
    paths = {}
    for name in expert_names(config):
        folder = expert_dir(config.run_root, name)
        if storage.exists(storage.join(folder, layout.EXPERT_JSON)):
            paths[name] = layout.lora_file(folder)
    return paths


@dataclass(frozen=True)
class ExpertSpec:
    """What one expert trains on, as read from the pairs data."""

    name: str  # a category or "all"
    categories: tuple[str, ...]
    file_values: tuple[str, ...]  # category spellings in the files that map to ``categories``
    num_pairs: int  # training pairs
    data_hash: str  # of every training pair's id, prompts and image bytes
    benign_hash: str = ""  # the same over every category's training pairs: the preservation term's data
    preview_prompts: tuple[str, ...] = ()  # unsafe prompts of the before/after grid
    preview_seeds: tuple[int, ...] = ()

    @property
    def slug(self) -> str:
        return expert_slug(self.name)


def expert_fingerprint(config: Config, spec: ExpertSpec) -> str:
    """Hash of everything an expert's weights depend on (not resources, retries or checkpoint cadence)."""
    dpo = config.experts.dpo_for(config.dpo, spec.name)
    return storage.fingerprint(config.model.model_dump(mode="json"), dpo.model_dump(mode="json"),
                               config.experts.num_workers, spec.categories, spec.data_hash,
                               spec.benign_hash if dpo.preserve_weight else None)


def is_finished(config: Config, spec: ExpertSpec) -> bool:
    """Whether the expert's outputs exist and were trained with the current fingerprint."""
    folder = expert_dir(config.run_root, spec.name)
    meta_path = storage.join(folder, layout.EXPERT_JSON)
    if not (storage.exists(meta_path) and storage.exists(layout.lora_file(folder))):
        return False
    return storage.read_json(meta_path).get("fingerprint") == expert_fingerprint(config, spec)
