"""Pinned before the cut became an object: what a checkpoint or a handshake depends on must not move.

Literal values computed on the code of commit bdaffb8: the base models' fingerprints, the session
fingerprints of two-part and U-shaped splits (sft and sl, ffn-output and ffn-input), and the state
dict layout (names, shapes, dtypes: what a saved checkpoint is loaded by) of every part each builder
makes, in one process and on each side.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from sft_common.models.base_model import load_base_model
from sft_common.topology.spec import FFN_INPUT, SplitSpec, session_fingerprint
from sft_common.topology.two_part import (
    build_cloud_half,
    build_edge_half,
    build_split_model,
    trained_skeleton,
)
from sft_common.topology.ushape import UShapeSpec, build_ushape_cloud, build_ushape_edge, build_ushape_model
from sft_common.topology.ushape_lm import trained_ushape

BASES = {
    "random:tiny": "e61a42b0231c407a399a12d212e7397a8a1720e82513f231886f7aad63522cf6",
    "random:tiny-llama": "466eeee51ce0d0458d07d461d3e6772d867c3f5abe8209fb00fe93dafe985f65",
    "random:tiny-gpt2": "748289c30181c3583345b5a0710f6aee147716e65aec99030cb2de502306357b",
}

# (preset, spec) -> (session fingerprint, with LoRA and 3 labels, one-process layout, edge + cloud
# layout, the trained-run skeleton's layout)
SPLITS = {
    ("random:tiny", SplitSpec(1, rank=4)): (
        "b5bfa57a3832badd3ab3b2750b80aa5a87d11047dbff005e0bb042cef0c1629c",
        "82e29147d70d9f5c9c54a5ea1a80bc3b8a1da6938006d3e5960e4aa12f8726cd",
        "b0e84a0cdf17f247",
        "b0e84a0cdf17f247",
        "b0e84a0cdf17f247",
    ),
    ("random:tiny", SplitSpec(0, rank=3, mode="sl")): (
        "5439fb680c2db1312b5ce08e684e013e62d4f0ac96ce3a3946db71712b893817",
        "2b225a88788da9a0e22260640fe1206938096aaa04f2f090c2af23bb95ca03b7",
        "f0362066b6e4f30a",
        "f0362066b6e4f30a",
        "f0362066b6e4f30a",
    ),
    ("random:tiny", SplitSpec(2, rank=5, factorise=FFN_INPUT)): (
        "0d38ba487c61be81af7dcca6e77e42af94ada6c60a050c656a3280fb27f6e3f4",
        "c9f3a833e46f5825f28bea6baeaee1be666958dfe41879f28b30f1d7455764ce",
        "0ea0721eee85fdcd",
        "0ea0721eee85fdcd",
        "0ea0721eee85fdcd",
    ),
    ("random:tiny-llama", SplitSpec(1, rank=4)): (
        "a676552164a47bb9fb73a5b35b2f484938d6ff9d40ffe11aa3d90c69972147f3",
        "52d4a2274babed82f59c4605988a87de27bbdfedb4ba6f0ba8de4d15072140ad",
        "2d0655da7aa6501d",
        "2d0655da7aa6501d",
        "2d0655da7aa6501d",
    ),
    ("random:tiny-llama", SplitSpec(1, rank=6, factorise=FFN_INPUT)): (
        "2e0c046e2490386ac6243203f3d8237b69080c5cb5a2c7f8234cda40429d3d6d",
        "7143285938a2bf210f7cc780021d75f615b575e246ad25980df9795d6fb70f61",
        "c44e803f5525bb9a",
        "c44e803f5525bb9a",
        "c44e803f5525bb9a",
    ),
    ("random:tiny-gpt2", SplitSpec(2, rank=2, mode="sl")): (
        "117c578755e91d062d691917def7d78b65ce70b8c9e139c5eb21fde862a0dee8",
        "9f291e36905cc93ff5f5861d8df62a9af8bef2c5b06acf8ec517b4914b240cc1",
        "a036fc5e0c88b299",
        "a036fc5e0c88b299",
        "a036fc5e0c88b299",
    ),
}

# (preset, spec) -> (session fingerprint, with LoRA, one-process layout, head + middle + tail layout,
# the trained-run skeleton's layout (and a decoder's causal-LM one))
USHAPES = {
    ("random:tiny", UShapeSpec(0, rank=4, tail_layers=1)): (
        "c67f3c962a635be2797ef7b2cf9bc40daaef134ce2ad662bec44f91185041366",
        "90923887339e2ade4173ce359d06b193d1c6018a3e5a919270ba086b5c3caf84",
        "97a17d277ad6505a",
        "97a17d277ad6505a",
        "97a17d277ad6505a",
    ),
    ("random:tiny", UShapeSpec(1, rank=4, tail_layers=1, mode="sl")): (
        "2b670e068eceeff708752d6eee4adc8b76323b8cfa49d7886bbb44c7204364cb",
        "cd5bcca6be4f4ac597e8c340382c73a9e3886ab75a4ae2e985fb2e261f44bc5d",
        "0d834ef1fe25bb7b",
        "0d834ef1fe25bb7b",
        "0d834ef1fe25bb7b",
    ),
    ("random:tiny-llama", UShapeSpec(0, rank=3, tail_layers=2)): (
        "5ca6fc8ae05897edafe506b2653353e1a1f54a7e7c8a812a3a7e587d81971dac",
        "d4791010efc6dc87c8f1717ec95ce7d92c658260b2ec28de32261e26d623b78a",
        "242e7ef43af90331",
        "242e7ef43af90331",
        "242e7ef43af90331 e2e0732bfa1b35e7",
    ),
    ("random:tiny-llama", UShapeSpec(0, rank=5, tail_layers=1, factorise=FFN_INPUT)): (
        "bacb74f45df250a9595a289f28ad8e5d71541ab331f170c0fa6eb2639cdb8890",
        "d658f1c2d48fb4aea7434dacfae69dce61d58e3366b1d8aeac7c38a81a9ef7fa",
        "ac5ea9da815143b7",
        "ac5ea9da815143b7",
        "ac5ea9da815143b7 e13c6f78ae47f586",
    ),
    ("random:tiny-gpt2", UShapeSpec(1, rank=4, tail_layers=1, factorise=FFN_INPUT)): (
        "c6834dce50b080a975c2efe189278bcea1316e5d0f3a4d918b17f663104960fb",
        "11560d71cf2cec0df27137103548f5169aa7394fb36d74513083d7f2013ef084",
        "b2b3524d74386dcd",
        "b2b3524d74386dcd",
        "b2b3524d74386dcd a185d904a7f24c11",
    ),
}

LORA = {"rank": 4, "alpha": 8.0, "targets": ["query", "value"]}

# session_fingerprint("base-fp", SplitSpec(3, 8), 2) before --svd-init existed (commit dbd5f8e),
# pinned by the --svd-init tests until that option left (after 2dbf857): unchanged through both
PLAIN_FINGERPRINT = "3c2da0192735e238dca4132d2638bce48d2ae4137187a479298b98aff70b6583"


def layout(*parts: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of every part's state dict names, shapes and dtypes, in order."""
    digest = hashlib.sha256()
    for part in parts:
        for name, tensor in part.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def bases():
    return {name: load_base_model(name) for name in BASES}


def test_the_session_fingerprint_from_before_svd_init_is_unchanged():
    assert session_fingerprint("base-fp", SplitSpec(split_layer=3, rank=8), 2) == PLAIN_FINGERPRINT


@pytest.mark.parametrize("name", sorted(BASES))
def test_base_fingerprints(bases, name):
    assert bases[name].fingerprint == BASES[name]


def split_fingerprints(base, spec):
    fingerprints = (
        session_fingerprint(base.fingerprint, spec, 2),
        session_fingerprint(base.fingerprint, spec, 3, LORA),
    )
    cloud, u = build_cloud_half(base, spec, 2, 0)
    edge = build_edge_half(base, spec, u)
    trained = layout(*trained_skeleton(base.config, spec, 2))
    return (*fingerprints, layout(*build_split_model(base, spec, 2, 0)), layout(edge, cloud), trained)


def ushape_fingerprints(base, spec):
    first, _ = spec.cuts(base.num_hidden_layers)
    fingerprints = (
        session_fingerprint(base.fingerprint, first, 0, None, spec.tail_layers),
        session_fingerprint(base.fingerprint, first, 0, LORA, spec.tail_layers),
    )
    middle, factors = build_ushape_cloud(base, spec)
    head, tail = build_ushape_edge(base, spec, 2, 0, factors)
    trained = layout(*trained_ushape(base.config, spec, 2))
    if base.family.decoder:  # the causal LM's tail (its LM head)
        trained += " " + layout(*trained_ushape(base.config, spec, 0))
    return (*fingerprints, layout(*build_ushape_model(base, spec, 2, 0)), layout(head, middle, tail), trained)


@pytest.mark.parametrize("key", list(SPLITS), ids=str)
def test_split_fingerprints(bases, key):
    name, spec = key
    assert split_fingerprints(bases[name], spec) == SPLITS[key]


@pytest.mark.parametrize("key", list(USHAPES), ids=str)
def test_ushape_fingerprints(bases, key):
    name, spec = key
    assert ushape_fingerprints(bases[name], spec) == USHAPES[key]


if __name__ == "__main__":  # prints the tables' values (how they were written)
    loaded = {name: load_base_model(name) for name in BASES}
    for key in SPLITS:
        print(key, split_fingerprints(loaded[key[0]], key[1]))
    for key in USHAPES:
        print(key, ushape_fingerprints(loaded[key[0]], key[1]))
