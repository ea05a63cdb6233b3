"""A vLLM worker extension that loads new policy weights: ``--worker-extension-cls`` of the engines ltpost starts.

vLLM mixes this class into its worker, so ``collective_rpc("ltpost_load_weights", kwargs=...)`` (in process) or
``POST /collective_rpc {"method": "ltpost_load_weights", ...}`` (a server started with ``VLLM_SERVER_DEV_MODE=1``)
runs it in every worker. It is vLLM's own in-place ``reload_weights`` plus one repair:

On the CPU backend a language-model head keeps a prepacked copy of its weight for its matrix multiply
(``cpu_linear``). When the head is tied to the input embedding (Llama, Qwen2.5 and the embedded tiny models), a
reload loads and repacks the embedding, but the head has no weight of its own in the checkpoint, so vLLM never
repacks it and keeps sampling from the old head (measured: log-probs 3 nats off after a push). Repacking tied
heads after each reload makes the engine's log-probs equal the policy's again (1e-5 in fp32). On GPU the head
reads the shared tensor directly and this does nothing.

This module imports vLLM only inside the methods, and nothing from ltpost beyond this package.
"""

from __future__ import annotations


def refresh_tied_heads(model) -> int:
    """Repack (CPU backend) every vocabulary head whose weight is the input embedding's; returns how many."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = [
        m.weight
        for m in model.modules()
        if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead) and hasattr(m, "weight")
    ]
    refreshed = 0
    for module in model.modules():
        if not isinstance(module, ParallelLMHead) or not hasattr(module, "cpu_linear"):
            continue
        if any(module.weight is weight for weight in embeddings):
            module.quant_method.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


class WeightSyncExtension:
    """Methods vLLM adds to its worker (``worker_extension_cls="ltpost.rollout.vllm_worker.WeightSyncExtension"``)."""

    def ltpost_load_weights(self, weights=None, weights_path: str | None = None) -> int:
        """Load ``weights`` (``(name, tensor)`` pairs, in process) or the safetensors under ``weights_path`` into the
        running model, in place, then repack tied heads. Returns the number of heads repacked."""
        if weights is None and weights_path is None:
            raise ValueError("ltpost_load_weights needs `weights` or `weights_path`.")
        self.reload_weights(weights_iterator=weights, weights_path=weights_path)
        return refresh_tied_heads(self.model_runner.get_model())
