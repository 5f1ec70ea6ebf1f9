"""lmforge model folders inside lm-evaluation-harness: `--model lmforge --model_args pretrained=DIR`.

The harness finds model classes in its own registry, filled by `@register_model` when the module
defining them is imported; it reads no entry points. So this module registers the class, and
running it runs the harness's own command line with the class known:

    python -m lmforge.evaluate.harness --model lmforge --model_args pretrained=DIR \\
        --tasks NAME --include_path TASK_DIR

Scores come from choice.py (the same function as `lmforge eval --task choice`), so the harness's
acc and acc_norm on a task equal lmforge's own on the same examples. lm-eval is a dev extra:
importing this module without it fails with a one-line error.
"""

from __future__ import annotations

from lmforge.errors import LmforgeError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - lm-eval is a dev extra
    raise LmforgeError("lm-evaluation-harness is not installed: pip install lm-eval") from None


@register_model("lmforge")
class LmforgeLM(LM):
    """The harness's three request types on an lmforge (or converted Hugging Face) decoder folder."""

    def __init__(self, pretrained: str, batch_size: int | str = 16, max_length: int | None = None, **_ignored):
        super().__init__()
        from lmforge.model_folder import load_model

        self.model, self.tokenizer = load_model(pretrained)
        self.model.eval()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" means the default
        self.max_length = int(max_length or self.model.config.block_size)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from lmforge.evaluate.choice import loglikelihoods

        return loglikelihoods(self.model, self.tokenizer, [r.args for r in requests], self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, the harness's way: windows of max_length targets,
        each token scored once, the first after the end-of-text token, each window with as much
        context before it as fits. All windows of all texts are scored in shared batches."""
        from lmforge.evaluate.choice import score_rows

        start = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.tokenizer.bos_id
        rows, owners = [], []
        for number, request in enumerate(requests):
            ids = [start, *self.tokenizer.encode(request.args[0])]
            for first in range(1, len(ids), self.max_length):  # targets ids[first:stop], context before them
                stop = min(first + self.max_length, len(ids))
                window = ids[max(0, stop - 1 - self.max_length):stop]
                rows.append((window[:-1], window[-(stop - first):]))
                owners.append(number)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        totals = [0.0] * len(requests)
        scores = score_rows(self.model, rows, self.batch_size, pad, greedy=False)
        for owner, (score, _) in zip(owners, scores, strict=True):
            totals[owner] += score
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lmforge.generate import GenerationConfig, generate

        outputs = []
        for request in requests:
            context, options = request.args
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            config = GenerationConfig(max_new_tokens=int(options.get("max_gen_toks", 256)), temperature=0.0,
                                      stop=tuple(until))
            text = generate(self.model, self.tokenizer, context, config)
            for stop in until:  # the harness expects the text before the first stop sequence
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
