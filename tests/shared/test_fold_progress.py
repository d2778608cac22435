"""fold_progress: a step's StepProgress tokens and its StepResult's, as one result per sequence, for a
caller that takes a step whole; nothing of either is lost, prompt logprobs included."""

from __future__ import annotations

from shared.messages import SeqOutput, StepProgress, StepResult, TokenLogprobs, fold_progress


def lp(x: float) -> TokenLogprobs:
    return TokenLogprobs(logprob=x)


def test_progress_and_result_fold_into_one_output_per_sequence_with_prompt_logprobs() -> None:
    progress = [StepProgress(step_id=3, outputs=[SeqOutput(seq_id=1, token_ids=[10], logprobs=[lp(-1.0)])]),
                StepProgress(step_id=3, outputs=[SeqOutput(seq_id=1, token_ids=[11], logprobs=[lp(-2.0)])])]
    result = StepResult(step_id=3, outputs=[
        SeqOutput(seq_id=1, token_ids=[12], logprobs=[lp(-3.0)]),
        SeqOutput(seq_id=2, token_ids=[], prompt_logprobs=[lp(-0.5), lp(-0.25)], prompt_logprobs_start=5),
        SeqOutput(seq_id=3, token_ids=[7], prompt_logprobs=[lp(-0.1)], prompt_logprobs_start=1),
    ])
    folded = {o.seq_id: o for o in fold_progress(progress, result).outputs}
    assert folded[1].token_ids == [10, 11, 12] and [x.logprob for x in folded[1].logprobs or []] == [-1.0, -2.0, -3.0]
    assert folded[1].prompt_logprobs is None
    assert folded[2].token_ids == [] and folded[2].prompt_logprobs_start == 5
    assert [x.logprob for x in folded[2].prompt_logprobs or []] == [-0.5, -0.25]
    assert folded[3].token_ids == [7] and folded[3].prompt_logprobs_start == 1
    assert [x.logprob for x in folded[3].prompt_logprobs or []] == [-0.1]
