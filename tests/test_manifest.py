"""The saved format has one owner (storage/manifest.py): written, read back, and a directory the
previous format version wrote still loads to the same outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_windows
from safetensors.torch import load_file

import rankwise
from rankwise.core.errors import ModelNotFoundError
from rankwise.model.accounting import targeted_totals
from rankwise.model.layers import SparseLowRankLinear
from rankwise.storage.manifest import FORMAT_VERSION, Manifest

FIXTURES = Path(__file__).parent / "fixtures"
V1 = FIXTURES / "v1_tiny"  # written by the version-1 code (sparse 0.3 on the tiny Llama)


def test_a_version_1_directory_loads_to_the_same_outputs() -> None:
    expected = load_file(str(FIXTURES / "v1_tiny_expected.safetensors"))
    model = rankwise.load(V1)  # no stored merge decision: every factor kept
    assert any(isinstance(m, SparseLowRankLinear) for m in model.modules())
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def test_a_version_1_block_reads_as_one_layer_list() -> None:
    block = json.loads((V1 / "config.json").read_text())["rankwise"]
    assert block["version"] == 1 and "targets" in block
    manifest = Manifest.read(V1)
    assert manifest.version == FORMAT_VERSION
    assert [e.name for e in manifest.layers] == [t["name"] for t in block["targets"]]
    for target in block["targets"]:  # version 1's derived count equals the accounting's
        assert manifest.by_name()[target["name"]].count.kept_params == target["kept_params"]
    assert targeted_totals(e.count for e in manifest.layers) == (
        block["targeted_params_before"],
        block["targeted_params_after"],
    )


def test_saving_again_writes_the_current_version(tmp_path: Path) -> None:
    shutil.copytree(V1, tmp_path / "v1")
    loaded = rankwise.load_model(str(tmp_path / "v1"))
    from rankwise.storage.saved import save_compressed

    out = save_compressed(loaded.model, tmp_path / "v2", Manifest.read(V1))
    block = json.loads((out / "config.json").read_text())["rankwise"]
    assert block["version"] == FORMAT_VERSION and "targets" not in block
    assert isinstance(block["layers"], list) and block["merge"]["policy"] == "never"
    assert Manifest.read(out).layers == Manifest.read(V1).layers


def test_the_manifest_round_trips_and_refuses_unknown_keys(tmp_path: Path) -> None:
    recipe = rankwise.Recipe(method="svd", ratio=0.3, allocation="uniform")
    result = rankwise.compress(make_model("llama"), recipe, windows=make_windows())
    out = Path(rankwise.save(result, str(tmp_path / "m")))
    manifest = Manifest.read(out)
    assert Manifest.from_block(manifest.to_block()) == manifest
    assert manifest.targeted_params_after == result.targeted_after
    assert [e.rank for e in manifest.layers] == [layer.rank for layer in result.layers]
    with pytest.raises(ValueError):
        Manifest.from_block({**manifest.to_block(), "surprise": 1})


def test_a_directory_without_a_manifest_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="not a rankwise model directory"):
        Manifest.read(tmp_path)


def test_the_manifest_keeps_recovery_without_its_per_step_losses() -> None:
    block = Manifest.read(V1).to_block()
    recovery = {"steps": 3, "seconds": 1.0, "losses": [3.0, 2.0, 1.0]}
    manifest = Manifest.from_block({**block, "recovery": recovery})
    assert manifest.recovery == {"steps": 3, "seconds": 1.0}
