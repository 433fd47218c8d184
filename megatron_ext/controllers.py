"""Online mixture controllers: Trainer callbacks that change what the run trains on.

- `DoReMi` (Xie et al. 2023, as the authors' `doremi/trainer.py` does it): Group DRO domain weights α
  against a frozen reference model; sampling stays the baseline mixture, the loss is reweighted; the
  running average ᾱ is the result (a static mixture for the target).
- `RegMixDOnline` (RegMix-D's online variant): at each switch point of the surrogate's grid, the observed
  validation loss, scaled to the proxies' size, conditions the frozen surrogate; the next segment's
  mixture is the same candidate search as `tools.search`, appended to the dataset as a new stage.

Both keep their state in the trainer's checkpoint (`callbacks: {name: state}`), so a kill and resume
gives the same weights and decisions. Every rank holds the same state: DoReMi's update is computed
from all-reduced sums on every rank; RegMix-D decides on rank 0 and broadcasts.
"""
import json
import math
import time

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_ext.atomic import atomic_write
from megatron_ext.callbacks import Callback
from megatron_ext.checkpointing import load_checkpoint
from megatron_ext.errors import UserError
from megatron_ext.evaluation import domain_sums, reduce_domain_sums
from megatron_ext.mixture_search import SearchConfig, check_search, search_prior, search_segment, segment_caps
from megatron_ext.surrogate import Surrogate, nonembedding_parameters, piecewise_average


def check_weights(weights, domains: list, where: str) -> np.ndarray:
    """A controller's weights as a float64 vector over `domains`; NaN, negative or all-zero weights
    stop the run with one line (before any save, so the last checkpoint stays valid)."""
    vector = np.asarray(weights, dtype=np.float64).reshape(-1)
    if vector.shape != (len(domains),) or not np.all(np.isfinite(vector)) or np.any(vector < 0) or vector.sum() <= 0:
        raise UserError(f"{where}: invalid mixture weights {vector.tolist()} for domains {domains} "
                        f"(need {len(domains)} finite, non-negative weights, not all 0)")
    return vector


def doremi_update(alpha: np.ndarray, excess: np.ndarray, eta: float, smoothing: float) -> np.ndarray:
    """One Group DRO step: α′ = softmax(log α + η·λ), α = (1 − c)·α′ + c/k."""
    logits = np.log(alpha) + eta * excess
    logits -= logits.max()
    prime = np.exp(logits) / np.exp(logits).sum()
    return (1 - smoothing) * prime + smoothing / len(alpha)


def doremi_excess(previous: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """λ: per-domain mean clipped excess loss over the step's tokens; a domain absent from the step keeps its λ."""
    return np.where(counts > 0, sums / np.maximum(counts, 1), previous)


def doremi_token_weights(alpha: np.ndarray, sampling: np.ndarray) -> np.ndarray:
    """Per-domain loss weight (α_i / s_i) / Σ_j (α_j / s_j): the authors' reweighting under non-uniform sampling."""
    ratio = alpha / sampling
    return ratio / ratio.sum()


def _running_average(average: np.ndarray, value: np.ndarray, count: int) -> np.ndarray:
    """ᾱ over `count` values (α₀ included), given ᾱ over count − 1 of them."""
    return (average * (count - 1) + value) / count


class DoReMi(Callback):
    """`--mixture-controller doremi --reference-load DIR`.

    Each step, before forward/backward: the proxy (no grad) and the frozen reference run forward on the
    step's micro-batches; λ_i = mean over domain i's tokens in the global batch of max(proxy − reference, 0)
    (a domain absent from the step keeps its λ); α is updated once; the step's loss is then the token
    cross-entropy weighted by (α_i/s_i)/Σ(α_j/s_j), normalized by the weights' sum over the global batch
    (as the authors normalize over all GPUs). α₀ = the baseline mixture s, λ₀ = ln(vocab) as theirs.
    """
    name = "doremi"

    def __init__(self, reference_load: str, eta: float, smoothing: float, weights_file=None):
        self.reference_load, self.eta, self.smoothing, self.weights_file = reference_load, eta, smoothing, weights_file

    def setup(self, trainer) -> None:
        self.domains = trainer.domains
        self.sampling = check_weights(list(trainer.train_ds.stage_weights(0).values()), self.domains, "doremi baseline")
        if np.any(self.sampling <= 0):
            zero = self.domains[int(np.argmin(self.sampling))]
            raise UserError(f"doremi: domain {zero!r} has weight 0 in the baseline mixture; DoReMi samples "
                            f"every domain (give it a positive weight or leave it out of the schedule)")
        if len(trainer.train_ds.stage_starts) != 1:
            raise UserError("doremi: sampling stays the baseline mixture; give a one-stage schedule")
        self.alpha = self.sampling / self.sampling.sum()
        self.average = self.alpha.copy()
        self.excess = np.full(len(self.domains), math.log(trainer.vocab))
        self.updates = 1  # the authors' counter: ᾱ counts α₀
        reference_gpt = trainer.build_gpt()
        self.reference = trainer.wrap_precision(reference_gpt)
        state = load_checkpoint(self.reference_load, reference_gpt, None, load_optimizer=False, load_rng=False)
        if state is None:
            raise UserError(f"--reference-load {self.reference_load}: no checkpoint there")
        ref_args, args = state.get("args", {}), vars(trainer.args)
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                    "tokenizer_type", "tokenizer_model", "vocab_size", "seq_length"):
            if ref_args.get(key) != args.get(key):
                raise UserError(f"--reference-load {self.reference_load}: --{key.replace('_', '-')} "
                                f"{ref_args.get(key)!r} differs from this run's {args.get(key)!r}")
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    # ---------------------------------------------------------------- the step
    def _token_losses(self, trainer, model, data) -> list:
        """Per-token losses [micro, seq] of `model` on this rank's micro-batches (last stage; else [])."""
        def step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], trainer.attention_mask, labels=batch["labels"])
            return output, lambda out: (out.sum() * 0, {"token loss": out.detach().float()})

        with torch.no_grad():
            out = trainer.forward_backward(forward_step_func=step, data_iterator=iter(data), model=[model],
                                           num_microbatches=len(data), seq_length=trainer.args.seq_length,
                                           micro_batch_size=trainer.args.micro_batch_size, forward_only=True)
        return [o["token loss"] for o in out]

    def on_batch(self, trainer, data):
        trainer.model.eval()
        proxy = self._token_losses(trainer, trainer.model, data)
        trainer.model.train()
        reference = self._token_losses(trainer, self.reference, data)
        outputs = []
        for batch, p, r in zip(data, proxy, reference):
            mask = batch["loss_mask"].float().to(p.device)
            s, c = domain_sums(torch.clamp(p - r, min=0), mask, batch["dataset_id"], len(self.domains))
            outputs.append({"sum": s, "count": c})
        sums, counts = reduce_domain_sums(outputs, "sum", "count", len(self.domains))
        sums, counts = sums.numpy(), counts.numpy()
        self.excess = doremi_excess(self.excess, sums, counts)
        alpha = check_weights(doremi_update(self.alpha, self.excess, self.eta, self.smoothing), self.domains,
                              f"doremi at iteration {trainer.iteration + 1}")
        self.alpha = alpha
        self.updates += 1
        self.average = _running_average(self.average, alpha, self.updates)
        self._weight_loss(trainer, data, doremi_token_weights(alpha, self.sampling))

    def _weight_loss(self, trainer, data, per_domain: np.ndarray) -> None:
        """Σ over the global batch of loss_weight·token loss = Σ w·ℓ / Σ w, after the schedule's 1/micro-batches
        and DDP's 1/DP: each token's weight w = per_domain[its domain] × mask, scaled by micro × DP / Σ w."""
        table = torch.tensor(per_domain, dtype=torch.float64)
        weights = [table[b["dataset_id"].long().cpu()][:, None] * b["loss_mask"].double().cpu() for b in data]
        total = torch.stack([w.sum() for w in weights]).sum().reshape(1)
        if parallel_state.get_data_parallel_world_size() > 1:
            torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        scale = len(data) * parallel_state.get_data_parallel_world_size() / max(float(total), 1e-10)
        for batch, w in zip(data, weights):
            batch["loss_weight"] = (w * scale).float().to(batch["tokens"].device)

    # ---------------------------------------------------------------- outputs and state
    def snapshot(self) -> dict:
        as_dict = lambda v: dict(zip(self.domains, map(float, v)))
        return {"weights": as_dict(self.alpha), "average_weights": as_dict(self.average),
                "excess_loss": as_dict(self.excess), "updates": self.updates}

    def on_step_end(self, trainer, step):
        metrics = {}
        for d, a, m, e in zip(self.domains, self.alpha, self.average, self.excess):
            metrics.update({f"doremi/weights/{d}": a, f"doremi/average_weights/{d}": m, f"doremi/excess_loss/{d}": e})
        trainer.log_metrics(metrics)

    def on_eval(self, trainer, record):
        record["doremi"] = self.snapshot()
        self.write(trainer)

    def on_fit_end(self, trainer):
        self.write(trainer)

    def write(self, trainer) -> None:
        """The running average ᾱ as JSON, with the train prefixes, for `tools.schedule from-doremi`."""
        if self.weights_file and trainer.rank == 0:
            schedule = trainer.schedule
            out = dict(self.snapshot(), iteration=trainer.iteration, domains=self.domains,
                       prefixes=dict(zip(schedule.domains, schedule.prefixes)), valid=schedule.valid,
                       baseline=dict(zip(self.domains, map(float, self.sampling))), eta=self.eta,
                       smoothing=self.smoothing, reference_load=self.reference_load)
            atomic_write(self.weights_file, json.dumps(out, indent=1))

    def state_dict(self):
        return {"domains": self.domains, "alpha": self.alpha.tolist(), "average": self.average.tolist(),
                "excess": self.excess.tolist(), "updates": self.updates}

    def load_state_dict(self, state):
        if state["domains"] != self.domains:
            raise UserError(f"doremi: the checkpoint's domains {state['domains']} differ from the schedule's "
                            f"{self.domains}")
        self.alpha, self.average, self.excess = (np.asarray(state[k], dtype=np.float64)
                                                 for k in ("alpha", "average", "excess"))
        self.updates = int(state["updates"])


def broadcast_from_rank0(obj):
    """rank 0's `obj` on every rank (pickled; gloo or nccl)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    torch.distributed.broadcast_object_list(box, src=0, device=device)
    return box[0]


class RegMixDOnline(Callback):
    """`--mixture-controller regmixd --surrogate DIR`: the paper's online RegMix-D.

    The run starts on its (one-stage) schedule: segment 0 is the prior. At each switch point t_j of the
    surrogate's grid (proxy progress maps linearly to the run's samples, rounded to a step), after the
    step that reaches it: evaluate, scale the observed target loss by (P_target / P_proxy)^beta, and ask
    the frozen surrogate at progress t_j (history: the realized mixture so far) with `search_segment`,
    the search `tools.search` runs offline (Dirichlet candidates around the prior, top-k mean, budgets,
    max-change, exclusions). Rank 0 decides and broadcasts; every rank appends the same stage.
    """
    name = "regmixd"

    def __init__(self, args):
        self.args = args

    def setup(self, trainer) -> None:
        args = self.args
        self.surrogate = sur = Surrogate.load(args.surrogate)
        if sur.meta["mode"] != "trajectory":
            raise UserError(f"--surrogate {args.surrogate}: a {sur.meta['mode']} surrogate; the online controller "
                            f"needs a trajectory surrogate (tools.fit --stages K)")
        self.domains = trainer.domains
        if sorted(sur.domains) != sorted(self.domains):
            raise UserError(f"--surrogate {args.surrogate}: its domains {sur.domains} do not match the schedule's "
                            f"{self.domains}")
        if len(trainer.train_ds.stage_starts) != 1:
            raise UserError("--mixture-controller regmixd appends the stages itself; give a one-stage schedule "
                            "(the prior, segment 0)")
        start = trainer.train_ds.stage_weights(0)
        self.prior = search_prior([start[d] for d in sur.domains], sur.domains,
                                  [d for d in args.controller_exclude.split(",") if d])
        self.target_tokens = trainer.train_samples * args.seq_length
        self.budgets = self._budgets(sur.domains)
        self.config = SearchConfig(stages=sur.stages, target_tokens=self.target_tokens, top_k=args.controller_top_k,
                                   seed=args.controller_seed, candidates=args.controller_candidates,
                                   alpha=args.controller_alpha, max_change=args.controller_max_change)
        self.objective = check_search(sur, self.config, self.prior, self.budgets)
        self.scale = self._loss_scale(args)
        gbs = args.global_batch_size
        self.switches = [int(round(t * trainer.train_iters)) * gbs for t in sur.stage_starts[1:]]
        if any(b <= a for a, b in zip([0] + self.switches, self.switches + [trainer.train_samples])):
            raise UserError(f"{trainer.train_iters} iterations are too few for the surrogate's grid {sur.grid} "
                            f"(switch points at samples {self.switches})")
        self.rng = np.random.default_rng(args.controller_seed)
        self.decisions = []

    def _budgets(self, domains) -> np.ndarray:
        args = self.args
        if args.controller_max_epochs is None:
            return np.full(len(domains), np.inf)
        if not args.controller_tokens:
            raise UserError("--controller-max-epochs needs --controller-tokens tokens.json")
        try:
            with open(args.controller_tokens) as f:
                info = json.load(f)["domains"]
            return args.controller_max_epochs * np.array([float(info[d]["train_tokens"]) for d in domains])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"--controller-tokens {args.controller_tokens}: no train_tokens for every domain "
                            f"({type(exc).__name__}: {exc})") from None

    def _loss_scale(self, args) -> float:
        """(P_target / P_proxy)^beta: the observed loss brought to the proxies' scale."""
        proxy = self.surrogate.meta.get("proxy_nonembedding_params")
        if args.controller_beta == 0:
            return 1.0
        if not proxy:
            raise UserError(f"--surrogate {args.surrogate}: meta.json lacks proxy_nonembedding_params; "
                            f"pass --controller-beta 0 to use the unscaled loss")
        target = nonembedding_parameters(args.num_layers, args.hidden_size, args.num_attention_heads,
                                         args.ffn_hidden_size, args.num_query_groups)
        return float((target / proxy) ** args.controller_beta)

    @property
    def pending(self) -> bool:
        return len(self.decisions) < len(self.switches)

    def wants_eval(self, trainer) -> bool:
        return self.pending and trainer.consumed_samples == self.switches[len(self.decisions)]

    def on_eval(self, trainer, record):
        if self.wants_eval(trainer):
            record["regmixd"] = self.decide(trainer, record)

    def decide(self, trainer, record) -> dict:
        """Rank 0 searches the next segment; every rank gets (decision, RNG state) and appends the stage."""
        j = len(self.decisions) + 1  # the segment that starts here
        answer = None
        if trainer.rank == 0:
            try:
                answer = (self.search(trainer, record, j), self.rng.bit_generator.state)
            except UserError as exc:
                answer = str(exc)
        answer = broadcast_from_rank0(answer)
        if isinstance(answer, str):
            raise UserError(answer)
        decision, rng_state = answer
        self.rng.bit_generator.state = rng_state
        trainer.train_ds.append_stage(decision["start_sample"], decision["weights"])
        self.decisions.append(decision)
        metrics = {"regmixd/observed": np.mean(list(decision["observed"].values())),
                   "regmixd/scaled": np.mean(list(decision["scaled"].values())),
                   "regmixd/predicted": decision["predicted_loss"], "regmixd/seconds": decision["seconds"]}
        metrics.update({f"regmixd/weights/{d}": w for d, w in decision["weights"].items()})
        trainer.log_metrics(metrics)
        return decision

    def search(self, trainer, record, j: int) -> dict:
        start_time = time.time()
        sur, ds = self.surrogate, trainer.train_ds
        progress = sur.stage_starts[j]
        starts = [s / trainer.train_samples for s in ds.stage_starts]
        realized = np.array([[ds.stage_weights(s)[d] for d in sur.domains] for s in range(len(starts))])
        history = piecewise_average(starts, realized, 0.0, progress)
        ends = sur.stage_starts[1:] + [1.0]
        lengths = [b - a for a, b in zip(sur.stage_starts[j:], ends[j:])]
        caps = segment_caps(self.budgets, history * progress * self.target_tokens, self.prior, self.target_tokens,
                            lengths, self.config.max_change)
        observed = {t: float(record["target"] if t == "target" else record["losses"][t]) for t in self.objective}
        scaled = {t: v * self.scale for t, v in observed.items()}
        segment = search_segment(sur, self.config, self.prior, self.rng, progress=progress, history=history,
                                 state=scaled, caps=caps, previous=realized[-1])
        weights = check_weights(segment.weights, sur.domains, f"regmixd at switch {j} (progress {progress:.4g})")
        return {"switch": j, "progress": progress, "iteration": trainer.iteration,
                "start_sample": self.switches[j - 1], "observed": observed, "scale": self.scale, "scaled": scaled,
                "predicted": segment.predicted, "predicted_loss": segment.loss,
                "weights": {d: float(w) for d, w in zip(sur.domains, weights / weights.sum())},
                "seconds": time.time() - start_time}

    def state_dict(self):
        return {"decisions": self.decisions, "rng": self.rng.bit_generator.state, "switches": self.switches}

    def load_state_dict(self, state):
        if state["switches"] != self.switches:
            raise UserError(f"regmixd: the checkpoint's switch points {state['switches']} differ from this run's "
                            f"{self.switches} (another surrogate or run length?)")
        self.decisions = list(state["decisions"])
        self.rng.bit_generator.state = state["rng"]


def build_controller(args):
    """The `--mixture-controller` callback, or None."""
    if args.mixture_controller == "doremi":
        return DoReMi(args.reference_load, args.doremi_eta, args.doremi_smoothing, args.doremi_weights_file)
    if args.mixture_controller == "regmixd":
        return RegMixDOnline(args)
    return None
