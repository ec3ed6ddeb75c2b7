"""Model-aware selectors: safety examples chosen by the base model itself (gradients, forgetting, hidden states).

All load `context.model_name` once per context (cache key `model:<name>`, eval mode, weights
frozen) and are deterministic for a fixed seed. Losses are next-token NLL on the final assistant
turn only (chat template applied; a pool example is request -> refusal).

- `gradient_alignment`: per-example gradients of that loss at the base weights w.r.t. the o_proj and
  down_proj weights of the last GRADIENT_LAYERS blocks, randomly projected (below). Fine-tuning moves
  the weights along -g_user (g_user = mean projected gradient of at most MAX_USER sampled user
  conversations), which to first order raises the loss of pool example s when g_s . g_user < 0: the
  k examples with the most negative cosine are the ones training on the user data erodes first
  (LESS, Xia et al. 2024; He et al. 2024, "What's in your safe data"). `gradient_alignment_stratified`
  takes them round-robin over harm categories.
  Projection: a weight gradient dW = sum_t delta_t x_t^T (out x in) is mapped to P_out^T dW P_in with
  seeded Gaussian P_in (in x r), P_out (out x r), entries N(0, 1/r): a Kronecker-factored random
  projection (LoGra, Choe et al. 2024) that preserves inner products in expectation like the dense
  Gaussian/Rademacher projection of TRAK and LESS, yet computes P_in^T x_t and P_out^T delta_t per
  token from forward/backward hooks, so no per-example gradient nor a (params x dim) matrix is ever
  materialised. r = FACTOR_DIM = 16 gives 256 dims per matrix: 2048 for 4 blocks.
- `forgetting`: a few LoRA SFT steps on a seeded sample of the user data (LoraSFTConfig defaults,
  constant learning rate), then each pool example's loss increase; the most-forgotten, round-robin
  over harm categories (categories ordered by their largest increase).
- `kmeans_hidden`, `kcenter_hidden`, `facility_location_hidden`, `nearest_user_hidden`, `dpp_hidden`:
  the representation selectors over the base model's residual stream entering the middle block,
  mean-pooled over the request's tokens (chat template applied to the user turn only), unit-normalised.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import replace
from typing import Sequence

import numpy as np

# torch and peft are imported inside the functions that use them, on purpose: importing the selector registry
# stays light (no torch) for the commands that never run a model-aware selector.
from safekeel.data.conversation import Conversation
from safekeel.models.capture import decoder_layers, length_batches as _batches, request_hidden_states
from safekeel.models.lora import LoraSFTConfig, lora_config
from safekeel.models.registry import load_model_and_tokenizer
from safekeel.selectors.base import Selection, SelectionContext, register_selector
from safekeel.selectors.representation import (
    DPPSelector,
    EmbeddingSpace,
    FacilityLocationSelector,
    KCenterSelector,
    KMeansSelector,
    NearestUserSelector,
)

GRADIENT_LAYERS = 4
FACTOR_DIM = 16
MAX_USER = 256
MAX_LENGTH = LoraSFTConfig.max_length
BATCH_SIZE = 8


def base_model(context: SelectionContext, user: str):
    """(model, tokenizer) for context.model_name, loaded once per context, eval mode, weights frozen.
    `user` names the selector(s) asking, for the error when the context has no model."""
    if context.model_name is None:
        raise ValueError(f"{user} needs the base model, but the selection context has no model_name")
    key = f"model:{context.model_name}"
    if key not in context.cache:
        model, tokenizer = load_model_and_tokenizer(context.model_name)
        model.eval()
        model.requires_grad_(False)
        context.cache[key] = (model, tokenizer)
    return context.cache[key]


# --- assistant-turn losses ----------------------------------------------------------------------------


def completion_tokens(tokenizer, conversation: Conversation, max_length: int = MAX_LENGTH) -> tuple[list[int], int]:
    """The conversation's token ids (chat template) and the index where its final assistant turn starts.
    Over max_length, a prompt longer than half the window loses its oldest tokens, then the tail is cut."""
    if conversation.completion is None:
        raise ValueError(f"conversation {conversation.source or '?'} does not end with an assistant turn")
    prompt = tokenizer.apply_chat_template([m.to_dict() for m in conversation.prompt_messages], tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation.to_messages(), tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the reply")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    start = next((i for i, (begin, _) in enumerate(encoded["offset_mapping"]) if begin >= len(prompt)), len(ids))
    if start >= len(ids):
        raise ValueError(f"conversation {conversation.source or '?'} has an empty assistant turn")
    drop = max(0, start - max_length // 2) if len(ids) > max_length else 0
    return ids[drop:drop + max_length], start - drop


def padded_batch(items: Sequence[tuple[list[int], int]], pad_id: int):
    """Right-padded input_ids, attention_mask and target mask (1 on assistant tokens) as tensors."""
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), width), dtype=torch.long)
    target = torch.zeros((len(items), width), dtype=torch.float32)
    for row, (ids, start) in enumerate(items):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
        target[row, start:len(ids)] = 1.0
    return input_ids, attention, target


def token_nll(model, input_ids, attention, target):
    """(sum of NLL over each row's target tokens, their count), both shape (batch,)."""
    import torch.nn.functional as F

    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = target[:, 1:]
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


def assistant_losses(model, tokenizer, conversations: Sequence[Conversation], batch_size: int = BATCH_SIZE,
                     max_length: int = MAX_LENGTH) -> np.ndarray:
    """Per conversation: mean NLL over its final assistant turn's tokens."""
    import torch

    items = [completion_tokens(tokenizer, c, max_length) for c in conversations]
    losses = np.zeros(len(items), dtype=np.float64)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for positions, batch in _batches(items, batch_size):
            total, count = token_nll(model, *padded_batch(batch, tokenizer.pad_token_id))
            losses[positions] = (total / count).double().numpy()
    model.train(was_training)
    return losses


def trainable_conversations(context: SelectionContext, selector: str) -> list[Conversation]:
    usable = [c for c in context.user_data if c.completion]
    if not usable:
        raise ValueError(f"selector {selector!r} needs user conversations ending with an assistant turn, and there are none")
    return usable


# --- gradient features ----------------------------------------------------------------------------------


def gradient_modules(model, n_layers: int = GRADIENT_LAYERS) -> list[tuple[str, object]]:
    """(name, Linear) for the o_proj and down_proj of the last n_layers decoder blocks."""
    layers = decoder_layers(model)
    chosen = []
    for index in range(max(0, len(layers) - n_layers), len(layers)):
        for path in ("self_attn.o_proj", "mlp.down_proj"):
            chosen.append((f"layers.{index}.{path}", layers[index].get_submodule(path)))
    return chosen


def projection_matrices(modules: Sequence[tuple[str, object]], factor_dim: int, seed: int) -> list[tuple[object, object]]:
    """Seeded (P_in, P_out) per module, entries N(0, 1/factor_dim)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    scale = 1.0 / math.sqrt(factor_dim)
    return [(torch.randn(module.in_features, factor_dim, generator=generator) * scale,
             torch.randn(module.out_features, factor_dim, generator=generator) * scale) for _, module in modules]


def projected_gradients(model, tokenizer, conversations: Sequence[Conversation], modules: Sequence[tuple[str, object]],
                        projections: Sequence[tuple[object, object]], batch_size: int = BATCH_SIZE,
                        max_length: int = MAX_LENGTH) -> np.ndarray:
    """Per conversation: the gradient of its mean assistant-token NLL w.r.t. each module's weight W,
    projected to P_out^T dW P_in and flattened, concatenated over modules: (n, modules x r x r).

    One forward/backward per batch gives every example's gradient exactly: the loss is a sum of
    per-example terms, so each row's output gradients delta_t only carry its own loss, and
    dW_row = sum_t delta_t x_t^T. The model's weights stay frozen: the hooked outputs are made
    differentiable and torch.autograd.grad differentiates the loss with respect to them alone."""
    import torch

    items = [completion_tokens(tokenizer, c, max_length) for c in conversations]
    width = sum(p_in.shape[1] * p_out.shape[1] for p_in, p_out in projections)
    features = np.zeros((len(items), width), dtype=np.float32)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, output):
            if not output.requires_grad:  # the first hooked module: start the graph here
                output.requires_grad_(True)
            inputs[index] = args[0].detach()
            outputs[index] = output

        return hook

    handles = [module.register_forward_hook(capture(i)) for i, (_, module) in enumerate(modules)]
    try:
        for positions, batch in _batches(items, batch_size):
            with torch.enable_grad():
                total, count = token_nll(model, *padded_batch(batch, tokenizer.pad_token_id))
                grads = torch.autograd.grad((total / count).sum(), [outputs[i] for i in range(len(modules))])
            with torch.no_grad():
                blocks = [torch.einsum("bto,bti->boi", grad @ p_out, inputs[i] @ p_in).flatten(1)
                          for i, (grad, (p_in, p_out)) in enumerate(zip(grads, projections))]
                features[positions] = torch.cat(blocks, dim=1).numpy()
            inputs.clear()
            outputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return features


def round_robin(priority: np.ndarray, categories: Sequence[str], k: int) -> list[int]:
    """k indices, lowest priority first within each category; categories take turns, ordered by their
    best (lowest) priority."""
    by_category: dict[str, list[int]] = {}
    for index in np.argsort(priority, kind="stable"):
        by_category.setdefault(categories[index], []).append(int(index))
    queues = list(by_category.values())
    chosen: list[int] = []
    for depth in range(max(len(q) for q in queues)):
        chosen += [q[depth] for q in queues if depth < len(q)][: k - len(chosen)]
        if len(chosen) == k:
            break
    return chosen


def _selection(name: str, context: SelectionContext, chosen: list[int], scores: np.ndarray, rationale: str, **details) -> Selection:
    return Selection(name, context.k, context.seed, [context.pool[i].id for i in chosen],
                     [round(float(scores[i]), 6) for i in chosen], rationale,
                     {"categories": [context.pool[i].category for i in chosen], "model": context.model_name, **details})


@register_selector("gradient_alignment")
class GradientAlignmentSelector:
    """The pool examples whose loss gradient is most opposed to the user data's (their loss rises first)."""

    name = "gradient_alignment"
    stratify = False
    n_layers = GRADIENT_LAYERS
    factor_dim = FACTOR_DIM
    max_user = MAX_USER

    def select(self, context: SelectionContext) -> Selection:
        started = time.perf_counter()
        users = trainable_conversations(context, self.name)
        if len(users) > self.max_user:
            users = [users[i] for i in sorted(random.Random(context.seed).sample(range(len(users)), self.max_user))]

        def features(conversations: Sequence[Conversation]) -> dict[str, np.ndarray]:
            model, tokenizer = base_model(context, f"selector {self.name!r}")
            modules = gradient_modules(model, self.n_layers)
            return {"features": projected_gradients(model, tokenizer, conversations, modules,
                                                    projection_matrices(modules, self.factor_dim, context.seed)),
                    "modules": np.array([f"{name}.weight" for name, _ in modules])}

        shape = {"n_layers": self.n_layers, "factor_dim": self.factor_dim, "projection_seed": context.seed}
        stored_pool, pool_read = context.persisted(
            "gradients-pool", lambda: features([e.to_conversation() for e in context.pool]), uses_user=False, **shape)
        stored_user, user_read = context.persisted(
            "gradients-user-mean", lambda: {"mean": features(users)["features"].mean(axis=0)},
            uses_pool=False, max_user=self.max_user, sample_seed=context.seed, **shape)
        pool, user = stored_pool["features"], stored_user["mean"]
        cosines = (pool @ user) / (np.linalg.norm(pool, axis=1) * np.linalg.norm(user) + 1e-30)
        if self.stratify:
            chosen = round_robin(cosines, [e.category for e in context.pool], context.k)
        else:
            chosen = [int(i) for i in np.argsort(cosines, kind="stable")[: context.k]]
        return _selection(
            self.name, context, chosen, cosines,
            "the pool examples whose assistant-turn loss gradient is most opposed to the mean gradient of the user data "
            "(fine-tuning on it raises their loss first)" + (", round-robin over harm categories" if self.stratify else "")
            + "; score = cosine",
            parameter_subset=[str(name) for name in stored_pool["modules"]],
            gradient_at="base model weights",
            projection=f"P_out^T dW P_in per weight, seeded Gaussian factors N(0, 1/{self.factor_dim}) (seed {context.seed})",
            projection_dim=int(pool.shape[1]), n_user_examples=len(users), stored_results_reused=pool_read and user_read,
            seconds=round(time.perf_counter() - started, 3))


@register_selector("gradient_alignment_stratified")
class StratifiedGradientAlignmentSelector(GradientAlignmentSelector):
    """gradient_alignment taken round-robin over harm categories (categories ordered by their most opposed example)."""

    name = "gradient_alignment_stratified"
    stratify = True


# --- forgetting --------------------------------------------------------------------------------------------


def lora_steps(model, tokenizer, conversations: Sequence[Conversation], steps: int, config: LoraSFTConfig):
    """A LoRA-adapted copy of `model` after `steps` AdamW steps (constant config.learning_rate) on
    `conversations` in order, config.batch_size per step, loss = mean NLL over the assistant tokens of
    the batch (as trl's completion-only loss). LoRA init seeded by config.seed. Returns (model, losses)."""
    import torch
    from peft import get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        tuned = get_peft_model(copy.deepcopy(model), lora_config(config))
    tuned.train()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    items = [completion_tokens(tokenizer, c, config.max_length) for c in conversations]
    losses = []
    for step in range(steps):
        batch = items[step * config.batch_size:(step + 1) * config.batch_size]
        total, count = token_nll(tuned, *padded_batch(batch, tokenizer.pad_token_id))
        loss = total.sum() / count.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    tuned.eval()
    return tuned, losses


def training_sample(available: int, needed: int, seed: int) -> list[int]:
    """`needed` indices into `available` conversations, a seeded sample without replacement (when there
    are fewer, every one in a seeded order, repeated in fresh orders until enough)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < needed:
        order += rng.sample(range(available), min(available, needed - len(order)))
    return order


@register_selector("forgetting")
class ForgettingSelector:
    """The pool examples whose loss rises most after a few LoRA steps on the user data, round-robin over categories."""

    name = "forgetting"
    steps = 8
    config = LoraSFTConfig()

    def select(self, context: SelectionContext) -> Selection:
        started = time.perf_counter()
        config = replace(self.config, seed=context.seed)
        users = trainable_conversations(context, self.name)
        order = training_sample(len(users), self.steps * config.batch_size, context.seed)
        conversations = [e.to_conversation() for e in context.pool]

        def losses_before() -> dict[str, np.ndarray]:
            model, tokenizer = base_model(context, f"selector {self.name!r}")
            return {"loss": assistant_losses(model, tokenizer, conversations, max_length=config.max_length)}

        def losses_after() -> dict[str, np.ndarray]:
            model, tokenizer = base_model(context, f"selector {self.name!r}")
            tuned, train_losses = lora_steps(model, tokenizer, [users[i] for i in order], self.steps, config)
            return {"loss": assistant_losses(tuned, tokenizer, conversations, max_length=config.max_length),
                    "train_loss": np.array(train_losses)}

        stored_before, before_read = context.persisted("pool-loss", losses_before, uses_user=False,
                                                       max_length=config.max_length)
        stored_after, after_read = context.persisted("forgetting-pool-loss", losses_after, steps=self.steps,
                                                     sft=config.to_dict())
        before, after, train_losses = stored_before["loss"], stored_after["loss"], stored_after["train_loss"].tolist()
        increase = after - before
        chosen = round_robin(-increase, [e.category for e in context.pool], context.k)
        return _selection(
            self.name, context, chosen, increase,
            f"the pool examples whose refusal loss rose most after {self.steps} LoRA steps on the user data, round-robin over "
            "harm categories (ordered by their largest increase); score = loss increase (mean NLL per assistant token)",
            steps=self.steps, lr=config.learning_rate, batch_size=config.batch_size, lora_r=config.lora_r,
            n_user_examples=len(set(order)), train_loss=[round(x, 4) for x in train_losses],
            loss_before=[round(float(before[i]), 6) for i in chosen], loss_after=[round(float(after[i]), 6) for i in chosen],
            stored_results_reused=before_read and after_read, seconds=round(time.perf_counter() - started, 3))


# --- hidden-state representation space -------------------------------------------------------------------------


class HiddenStateSpace(EmbeddingSpace):
    """The base model's residual stream entering decoder block `layer` (default: the middle one,
    num_hidden_layers // 2), mean-pooled over the request (pool) or last user turn (user data)."""

    def __init__(self, layer: int | None = None):
        self.layer = layer

    def resolved_layer(self, context: SelectionContext) -> int:
        model, _ = base_model(context, "a *_hidden selector")
        count = model.config.num_hidden_layers
        layer = count // 2 if self.layer is None else self.layer
        if not 0 <= layer < count:
            raise ValueError(f"layer {layer} is outside the model's {count} decoder blocks")
        return layer

    def cache_key(self, context: SelectionContext, name: str) -> str:
        return f"hidden:{context.model_name}:layers.{self.resolved_layer(context)}:{name}"

    def embed_pool(self, context: SelectionContext) -> np.ndarray:
        model, tokenizer = base_model(context, "a *_hidden selector")
        return request_hidden_states(model, tokenizer, [e.request for e in context.pool], self.resolved_layer(context))

    def embed_user(self, context: SelectionContext) -> np.ndarray:
        model, tokenizer = base_model(context, "a *_hidden selector")
        return request_hidden_states(model, tokenizer, [c.last_user[:2000] for c in context.user_data], self.resolved_layer(context))

    def details(self, context: SelectionContext) -> dict:
        layer = self.resolved_layer(context)
        return {"embedder": f"{context.model_name} hidden states", "hookpoint": f"layers.{layer} (input to block {layer})",
                "pooling": "mean over the request's tokens (chat template, user turn only), unit-normalised"}


HIDDEN_STATES = HiddenStateSpace()


@register_selector("kmeans_hidden")
class KMeansHiddenSelector(KMeansSelector):
    """kmeans over the base model's mid-layer hidden states instead of sentence embeddings."""

    name = "kmeans_hidden"
    space = HIDDEN_STATES


@register_selector("kcenter_hidden")
class KCenterHiddenSelector(KCenterSelector):
    """kcenter over the base model's mid-layer hidden states instead of sentence embeddings."""

    name = "kcenter_hidden"
    space = HIDDEN_STATES


@register_selector("facility_location_hidden")
class FacilityLocationHiddenSelector(FacilityLocationSelector):
    """facility_location over the base model's mid-layer hidden states instead of sentence embeddings."""

    name = "facility_location_hidden"
    space = HIDDEN_STATES


@register_selector("nearest_user_hidden")
class NearestUserHiddenSelector(NearestUserSelector):
    """nearest_user over the base model's mid-layer hidden states instead of sentence embeddings."""

    name = "nearest_user_hidden"
    space = HIDDEN_STATES


@register_selector("dpp_hidden")
class DPPHiddenSelector(DPPSelector):
    """dpp over the base model's mid-layer hidden states instead of sentence embeddings."""

    name = "dpp_hidden"
    space = HIDDEN_STATES
