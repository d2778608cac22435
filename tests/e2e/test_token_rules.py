"""logit_bias and allowed_token_ids through the gRPC API on the CPU data plane (the real sampler):
a +100 bias forces its token, a -100 bias bans the greedy choice, and allowed ids bound what a
sampled completion can hold -- each against the same request without the rule."""

from __future__ import annotations

from controlplane.protogen.duetserve.v1 import generation_pb2 as pb
from tests.e2e.conftest import generate, serve

PROMPT = {"token_ids": {"ids": [5, 9, 13, 17, 21, 25]}, "ignore_eos": True, "max_tokens": 10}


async def test_logit_bias_and_allowed_token_ids_steer_the_tokens() -> None:
    async with serve("tiny") as served:
        plain = await generate(served.stub, **PROMPT, temperature=0.0)
        forced = await generate(served.stub, **PROMPT, temperature=0.0, logit_bias={77: 100.0})
        assert forced.token_ids == [77] * 10 and plain.token_ids != forced.token_ids
        first = plain.token_ids[0]
        banned = await generate(served.stub, **{**PROMPT, "max_tokens": 1}, temperature=0.0,
                                logit_bias={first: -100.0})
        assert banned.token_ids[0] != first
        allowed = [40, 41, 42, 200]
        sampled = await generate(served.stub, **PROMPT, temperature=1.5, seed=3, allowed_token_ids=allowed)
        assert len(sampled.token_ids) == 10 and set(sampled.token_ids) <= set(allowed)
        free = await generate(served.stub, **PROMPT, temperature=1.5, seed=3)
        assert not set(free.token_ids) <= set(allowed)  # the rule, not the seed, bounds them
        many = [m async for m in served.stub.Generate(pb.GenerateRequest(**PROMPT, temperature=1.0, n=3,
                                                                          allowed_token_ids=[7, 8]))]
        assert sum(len(m.token_ids) for m in many) == 30 and {t for m in many for t in m.token_ids} <= {7, 8}
