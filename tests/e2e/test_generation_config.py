"""A checkpoint's generation_config.json sampling defaults through the gRPC API (vLLM's
--generation-config auto): unset fields take them, set fields win, `none` ignores them."""

from __future__ import annotations

import json
import shutil

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import generate, serve


async def test_the_models_generation_config_is_the_default(checkpoints, tmp_path) -> None:  # noqa: ANN001
    folder = tmp_path / "greedy-by-default"
    shutil.copytree(checkpoints["qwen3"], folder)
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 20}))
    ask = {"token_ids": {"ids": [5, 6, 7]}, "max_tokens": 12, "ignore_eos": True}
    async with serve(str(folder)) as served:
        info = await served.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert dict(info.sampling_defaults) == {"temperature": 0.0, "top_k": 20.0}
        runs = [await generate(served.stub, **ask, seed=seed) for seed in (1, 2, 3)]
        assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids  # the model's temperature 0
        sampled = [await generate(served.stub, **ask, seed=seed, temperature=1.0, top_k=-1) for seed in (1, 2, 3)]
        assert len({tuple(r.token_ids) for r in sampled}) > 1  # the request's own temperature wins
    async with serve(str(folder), generation_config="none") as served:
        assert not (await served.stub.GetModelInfo(pb.GetModelInfoRequest())).sampling_defaults
        neutral = [await generate(served.stub, **ask, seed=seed) for seed in (1, 2, 3)]
        assert len({tuple(r.token_ids) for r in neutral}) > 1  # temperature 1: the seeds differ
