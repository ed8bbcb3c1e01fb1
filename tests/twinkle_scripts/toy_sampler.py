"""A stand-in for ``vLLMSampler`` that runs on CPU: a Twinkle component holding its own copy of the model.

``ToySampler`` is declared the way Twinkle declares its samplers (``@remote_class`` over ``Sampler`` and
``CheckpointEngineMixin``, methods under ``@remote_function`` with vLLMSampler's dispatch and collect), so the
GRPO loop, ``CheckpointEngineManager`` and the reward code consume it exactly as they consume vLLM:

* ``receive_weights`` takes the weight stream of the checkpoint engine: the first sync carries the base model
  (names with ``.base_layer``, which are stripped to load them into the plain Hugging Face model), later syncs
  carry only the LoRA matrices (``...lora_A.weight`` / ``...lora_B.weight``) and the PEFT config, whose
  ``lora_alpha / r`` scales them;
* ``sample`` decodes ``max_tokens`` tokens per prompt with the merged weights ``W + scale * B @ A``, drawing each
  token from the softmax at ``temperature`` with a ``torch.Generator`` seeded from (sampling seed, rank, call
  number, prompt index): deterministic, yet different for the copies of one prompt. It returns Twinkle's
  ``SampleResponse`` / ``SampledSequence`` with ``tokens``, ``logprobs`` (``[[(token, logprob)]]`` per token,
  the raw model log-probability as vLLM reports it), ``decoded`` and ``new_input_feature``
  (``template.concat_input_feature``);
* ``weights_digest`` returns the SHA-256 of the weights it holds, to prove a sync delivered the model's weights.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import numpy as np
from twinkle import DeviceMesh, Platform, remote_class, remote_function
from twinkle.checkpoint_engine import CheckpointEngineMixin
from twinkle.data_format import SampledSequence, SampleResponse, SamplingParams
from twinkle.sampler.base import Sampler


def _to_lists(obj: Any) -> Any:
    """Numpy arrays and scalars inside ``obj`` as Python lists and numbers (as vLLMSampler returns them)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_lists(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_lists(v) for v in obj]
    return obj


def _run(coro: Any) -> Any:
    """Run ``coro`` to completion on a fresh event loop in a helper thread (the caller may own a loop)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def lora_key(name: str) -> str:
    """A LoRA parameter name as the weight sync sends it: no ``base_model.model.`` prefix, no adapter name."""
    name = name.removeprefix('base_model.model.')
    for part in ('lora_A', 'lora_B'):
        head, sep, tail = name.partition(f'.{part}.')
        if sep and tail.count('.') == 1:
            # ``...lora_A.<adapter>.weight`` -> ``...lora_A.weight``
            name = f'{head}.{part}.{tail.split(".", 1)[1]}'
    return name


@remote_class()
class ToySampler(Sampler, CheckpointEngineMixin):
    """Deterministic CPU sampler over a local copy of a causal LM; see the module docstring.

    Parameters
    ----------
    model_id : str
        Local model folder (as saved by ``save_pretrained``).
    device_mesh : DeviceMesh, optional
        Data-parallel mesh of the sampler group; ``sample`` inputs are sliced over its data ranks.
    """

    def __init__(self, model_id: str, device_mesh: DeviceMesh = None, **kwargs: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__()
        self.model_id = model_id
        self.device_mesh = device_mesh
        self.model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32).eval()
        self.lora: dict[str, Any] = {}
        self.lora_scale = 0.0
        self.syncs = 0
        self.calls = 0

    def apply_patch(self, patch_cls: Any, **kwargs: Any) -> None:
        raise NotImplementedError('ToySampler takes no patches')

    @remote_function(dispatch='all', collect='first')
    def reset_prefix_cache(self) -> None:
        """No cache to reset (kept so the GRPO loop calls what it calls on vLLM)."""

    @remote_function(dispatch='all', collect='first', lazy_collect=False)
    def get_state_keys(self) -> list[str]:
        return list(self.model.state_dict().keys())

    @remote_function(dispatch='all', lazy_collect=True)
    def receive_weights(self, base_sync_done: bool = False, peft_config: dict[str, Any] | None = None) -> int:
        """Load the weights of one sync from the checkpoint engine; returns how many tensors arrived."""
        import torch

        engine = self._get_or_create_checkpoint_engine()

        async def collect() -> list[tuple[str, Any]]:
            return [(name, tensor.clone()) async for name, tensor in engine.receive_weights()]

        received = _run(collect())
        if base_sync_done and peft_config:
            self.lora = dict(received)
            rank = peft_config['r']
            self.lora_scale = peft_config['lora_alpha'] / (rank**0.5 if peft_config.get('use_rslora') else rank)
        else:
            state = {name.replace('.base_layer', ''): tensor for name, tensor in received}
            with torch.no_grad():
                self.model.load_state_dict(state, strict=True)
            self.lora = {}
            self.lora_scale = 0.0
        self.syncs += 1
        return len(received)

    @remote_function(dispatch='all', lazy_collect=False)
    def weights_digest(self) -> dict[str, Any]:
        """SHA-256 of the base weights and of the LoRA weights this rank holds, and the number of syncs."""
        from script_utils import tensor_digest

        return {
            'base': tensor_digest(self.model.state_dict()),
            'lora': tensor_digest(self.lora),
            'syncs': self.syncs,
        }

    def _merged_parameters(self) -> dict[str, Any]:
        params = dict(self.model.named_parameters())
        for name, a in self.lora.items():
            if '.lora_A.' not in name:
                continue
            prefix = name.split('.lora_A.')[0]
            b = self.lora[f'{prefix}.lora_B.weight']
            params[f'{prefix}.weight'] = params[f'{prefix}.weight'] + self.lora_scale * (b @ a)
        return params

    @remote_function(dispatch='slice_dp', collect='flatten', lazy_collect=False)
    def sample(self,
               inputs: Any,
               sampling_params: SamplingParams | dict[str, Any] | None = None,
               adapter_name: str = '',
               **kwargs: Any) -> list[SampleResponse]:
        import torch

        if sampling_params is None:
            sampling_params = SamplingParams()
        elif isinstance(sampling_params, dict):
            sampling_params = SamplingParams.from_dict(sampling_params)
        features = self._normalize_inputs(inputs)
        if self._is_trajectory(features):
            features = [self.encode_trajectory(feature, adapter_name) for feature in features]
        max_tokens = sampling_params.max_tokens or 16
        eos = self.template.tokenizer.eos_token_id
        params = self._merged_parameters()
        seed = 0 if sampling_params.seed is None else sampling_params.seed
        rank = max(Platform.get_rank(), 0)
        self.calls += 1
        responses = []
        with torch.no_grad():
            for index, feature in enumerate(features):
                generator = torch.Generator().manual_seed(((seed * 1009 + rank) * 1009 + self.calls) * 1009 + index)
                prompt = [int(t) for t in feature['input_ids']]
                ids, tokens, logprobs, stop_reason = list(prompt), [], [], 'length'
                for _ in range(max_tokens):
                    out = torch.func.functional_call(self.model, params, (torch.tensor([ids]), ))
                    logits = out.logits[0, -1].double()
                    raw = torch.log_softmax(logits, dim=-1)
                    if sampling_params.temperature == 0:
                        token = int(torch.argmax(logits))
                    else:
                        probs = torch.softmax(logits / sampling_params.temperature, dim=-1)
                        token = int(torch.multinomial(probs, 1, generator=generator))
                    tokens.append(token)
                    logprobs.append([(token, float(raw[token]))])
                    ids.append(token)
                    if token == eos:
                        stop_reason = 'stop'
                        break
                sequence = SampledSequence(
                    stop_reason=stop_reason,
                    tokens=tokens,
                    logprobs=logprobs,
                    decoded=self.template.decode(tokens),
                    new_input_feature=_to_lists(self.template.concat_input_feature(feature, tokens)),
                )
                responses.append(SampleResponse(sequences=[sequence], prompt_token_ids=prompt))
        return responses
