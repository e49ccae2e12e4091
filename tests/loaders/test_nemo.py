"""NeMo's three loaders read a copied dataset with only the settings the README gives: the classic dataset on clip
files, the tarred dataset on shards, and the Lhotse-based loader on both and on the Lhotse export. One epoch each;
every clip's audio equal to soundfile's read of it, with its own transcript and language."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nemo.collections.asr.data.audio_to_text import AudioToCharDataset, TarredAudioToCharDataset
from nemo.collections.common.data.lhotse import get_lhotse_dataloader_from_config
from omegaconf import OmegaConf

from tests.loaders.helpers import clips, samples


def manifest(root: Path) -> list[dict]:
    with open(root / "nemo_manifest.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def transcribed(root: Path) -> dict[str, dict]:
    """The clips a supervised manifest holds, by transcript (the demo's are all different)."""
    by_text = {row["transcript_text"]: row for row in clips(root).values() if row["transcript_text"] is not None}
    assert len(by_text) == 5
    return by_text


def labels(root: Path) -> list[str]:
    return sorted({c for line in manifest(root) for c in line["text"]})


def check_items(root: Path, items: list[tuple[torch.Tensor, torch.Tensor]], chars: list[str]) -> None:
    """Each (audio, tokens) item is one transcribed clip's samples, exactly, with its transcript; none twice."""
    rows = transcribed(root)
    seen = []
    for audio, tokens in items:
        text = "".join(chars[t] for t in tokens.tolist())
        row = rows[text]
        assert np.array_equal(audio.numpy(), samples(root, row)[:, 0]), row["clip_id"]
        seen.append(text)
    assert sorted(seen) == sorted(rows)


def epoch(dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch in batches of 2, as NeMo's own collate pads them: the items unpadded again."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=dataset.collate_fn)
    items = []
    for audio, audio_len, tokens, tokens_len in loader:
        assert audio.ndim == 2  # (batch, samples): mono, from a 1-, 2- or 3-channel object alike
        items += [(audio[i, : audio_len[i]], tokens[i, : tokens_len[i]]) for i in range(len(audio))]
    return items


def test_classic_dataset_reads_the_clip_files(mixed_files: Path) -> None:
    chars = labels(mixed_files)
    dataset = AudioToCharDataset(
        manifest_filepath=str(mixed_files / "nemo_manifest.jsonl"), labels=chars, sample_rate=16_000
    )
    check_items(mixed_files, epoch(dataset), chars)


def test_classic_dataset_averages_kept_channels_with_channel_selector(kept_files: Path) -> None:
    """`--channels keep`: the README's `channel_selector: average` gives the mean of each clip's channels."""
    chars = labels(kept_files)
    dataset = AudioToCharDataset(
        manifest_filepath=str(kept_files / "nemo_manifest.jsonl"),
        labels=chars,
        sample_rate=16_000,
        channel_selector="average",
    )
    rows = transcribed(kept_files)
    for audio, _, tokens, _ in (dataset[i] for i in range(len(dataset))):
        row = rows["".join(chars[t] for t in tokens.tolist())]
        assert np.allclose(audio.numpy(), samples(kept_files, row).mean(axis=1), atol=1e-6), row["clip_id"]


def test_tarred_dataset_reads_the_shards(mixed_shards: Path) -> None:
    chars = labels(mixed_shards)
    last = len(list((mixed_shards / "shards").glob("audio_*.tar"))) - 1
    dataset = TarredAudioToCharDataset(
        audio_tar_filepaths=str(mixed_shards / "shards" / f"audio_{{00000..{last:05d}}}.tar"),
        manifest_filepath=str(mixed_shards / "nemo_manifest.jsonl"),
        labels=chars,
        sample_rate=16_000,
        shuffle_n=0,
        global_rank=0,
        world_size=1,
    )
    check_items(mixed_shards, epoch(dataset), chars)


class Cuts(torch.utils.data.Dataset):
    """What a NeMo model's Lhotse dataset does with a batch of cuts: load each one's audio and supervision."""

    def __getitem__(self, cuts):
        return [(cut.load_audio(), cut.supervisions) for cut in cuts]


def lhotse_epoch(**settings) -> list[tuple[np.ndarray, list]]:
    """One pass of NeMo's Lhotse-based loader with the README's settings (and `force_finite`: NeMo iterates
    tarred data endlessly, a trainer stops at max_steps)."""
    base = {"use_lhotse": True, "batch_size": 2, "num_workers": 0, "sample_rate": 16_000}
    config = OmegaConf.create({**base, **settings})
    loader = get_lhotse_dataloader_from_config(config, global_rank=0, world_size=1, dataset=Cuts())
    return [item for batch in loader for item in batch]


@pytest.mark.parametrize("source", ["nemo_manifest", "lhotse_cuts", "shards", "shar"])
def test_lhotse_based_loader_reads_every_layout(
    mixed_files: Path, mixed_shards: Path, mixed_shar: Path, source: str
) -> None:
    root = {"shards": mixed_shards, "shar": mixed_shar}.get(source, mixed_files)
    if source == "shar":
        items = lhotse_epoch(shar_path=str(root / "shar"), force_finite=True)
    elif source == "nemo_manifest":
        items = lhotse_epoch(manifest_filepath=str(root / "nemo_manifest.jsonl"))
    elif source == "lhotse_cuts":
        items = lhotse_epoch(cuts_path=str(root / "lhotse_cuts.jsonl.gz"))
    else:
        last = len(list((root / "shards").glob("audio_*.tar"))) - 1
        items = lhotse_epoch(
            manifest_filepath=str(root / "nemo_manifest.jsonl"),
            tarred_audio_filepaths=str(root / "shards" / f"audio__OP_00000..{last:05d}_CL_.tar"),
            skip_missing_manifest_entries=True,
            force_finite=True,
        )
    rows = transcribed(root)
    seen = []
    for audio, supervisions in items:
        (sup,) = supervisions
        row = rows[sup.text]
        assert sup.language == row["language"] == "en"
        assert audio.shape[0] == 1 and np.array_equal(audio[0], samples(root, row)[:, 0]), row["clip_id"]
        seen.append(sup.text)
    assert sorted(seen) == sorted(rows), "each transcribed clip once, the untranscribed one in none"
