"""GRPO's sampling in Ray actors of its own (`method.grpo.rollout.workers`), the layout of large-model
RL systems: generation on its own resources while the learners train, the policy's weights sent over.

Rank 0 of the training group starts the actors; each builds the job's model with its method applied,
as a training worker does. Every `sync_every` rollouts rank 0 pushes the trainable weights (the
adapters alone for PEFT methods) through Ray's object store, tagged with the rollout they were taken
at: the policy version. Every learner sends each of its micro batches to an actor with the version it
expects, and an actor samples only once it holds that version, so a learner that runs ahead of rank
0's push waits rather than sampling with old weights. Completions come from the same seeded group
sampler as in the training workers, so with `sync_every: 1` a run equals one that samples in its
workers. With older weights (`sync_every` above 1) or several optimizer steps per rollout, the actor
also returns its log-probabilities of the rows it sampled: the clipped ratio is taken against the
policy that really sampled.

The actors are owned by rank 0's process: they end with the run, and a worker group that Ray
restarts starts fresh ones (and pushes its restored weights first).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from ftcluster.config.spec import JobSpec
from ftcluster.core.errors import FtError
from ftcluster.core.worker import WorkerContext
from ftcluster.objectives.grpo.sampling import PromptBatch, Sampled
from ftcluster.planning.capacity import rollout_actor_resources

WEIGHTS_WAIT_S = 600.0  # how long a sampling request waits for its policy version before the run fails


class RolloutWorker:
    """A rollout actor: a copy of the policy that samples groups of completions. Threaded, so that a
    learner's request can wait for its weights while another request samples; one at a time samples."""

    def __init__(self, spec_config: dict[str, Any], threads: int, use_gpu: bool):
        import torch

        from ftcluster.core.quiet import quiet_libraries
        from ftcluster.models.load import load_tokenizer, resolve_model
        from ftcluster.objectives.grpo.sampling import GroupSampler
        from ftcluster.training.setup import load_model, seed_everything

        quiet_libraries()
        spec = JobSpec.model_validate(spec_config)
        torch.set_num_threads(threads)
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        resolved = resolve_model(spec.model.path)
        self.tokenizer = load_tokenizer(resolved, spec.model.revision)
        seed_everything(spec.training.seed)
        self.model = load_model(spec, WorkerContext(), self.device, resolved, self.tokenizer, None, None).eval()
        assert spec.method.grpo is not None
        self.sample_groups = GroupSampler(self.tokenizer, spec.method.grpo, self.device)
        self.version = -1
        self.version_changed = threading.Condition()
        self.busy = threading.Lock()

    def ready(self) -> str:
        """The node this actor runs on (and proof that its model loaded)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def load_weights(self, version: int, state: dict[str, Any]) -> None:
        """Take the policy's trainable weights of rollout `version`."""
        with self.busy:
            unexpected = self.model.load_state_dict(state, strict=False).unexpected_keys
            if unexpected:
                raise FtError(f"rollout actor: the pushed weights name {len(unexpected)} tensors its model lacks "
                              f"(first: {unexpected[0]})")
        with self.version_changed:
            self.version = version
            self.version_changed.notify_all()

    def sample(self, version: int, prompts: list[list[int]], seeds: list[int],
               with_logps: bool) -> tuple[list[list[list[int]]], Any]:
        """One micro batch's groups, sampled with the weights of rollout `version` (waited for), and the
        sampling policy's log-probabilities of the completions when asked."""
        import torch

        from ftcluster.evaluation.shared_prompt import completion_token_logps, rollout_batch

        with self.version_changed:
            if not self.version_changed.wait_for(lambda: self.version >= version, timeout=WEIGHTS_WAIT_S):
                raise FtError(f"rollout actor: the weights of rollout {version} did not arrive within "
                              f"{WEIGHTS_WAIT_S:g} s (it holds rollout {self.version}'s)")
        if self.version != version:
            raise FtError(f"rollout actor: asked to sample with rollout {version}'s weights, holds {self.version}'s")
        with self.busy, torch.no_grad():
            groups = self.sample_groups(self.model, prompts, seeds)
            if not with_logps:
                return groups, None
            batch = rollout_batch(prompts, groups, self.tokenizer.pad_token_id)
            logps = completion_token_logps(self.model, {key: value.to(self.device) for key, value in batch.items()})
        return groups, logps.cpu()


class RemoteSampler:
    """The learners' side: pushes weights (rank 0) and has the actors sample each micro batch."""

    def __init__(self, actors: list, spec: JobSpec, ctx: WorkerContext):
        grpo = spec.method.grpo
        assert grpo is not None
        self.actors, self.sync_every, self.rank = actors, grpo.rollout.sync_every, ctx.rank
        self.with_logps = grpo.rollout.sync_every > 1 or grpo.steps_per_rollout > 1
        self.first: int | None = None  # this process's first rollout: its weights are pushed whatever the step
        self.pushed: int | None = None

    def version(self, rollout: int) -> int:
        """The rollout whose weights sample `rollout`: the last push, every `sync_every` rollouts (and at the
        first rollout of a process, e.g. after a restart). The same on every learner."""
        if self.first is None:
            self.first = rollout
        return max(self.first, rollout - rollout % self.sync_every)

    def __call__(self, model, batches: list[PromptBatch], rollout: int) -> list[Sampled]:
        import ray

        version = self.version(rollout)
        if self.rank == 0 and version != self.pushed:
            self.push(model, version)
        calls = [self.actors[(self.rank * len(batches) + index) % len(self.actors)].sample.remote(
                     version, prompts, seeds, self.with_logps) for index, (prompts, seeds) in enumerate(batches)]
        return [Sampled(groups, logps) for groups, logps in ray.get(calls)]

    def push(self, model, version: int) -> None:
        """Send the trainable weights to every actor (one copy in the object store) and wait until loaded."""
        import ray

        state = {name: parameter.detach().to("cpu", copy=True) for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
        shared = ray.put(state)
        ray.get([actor.load_weights.remote(version, shared) for actor in self.actors])
        self.pushed = version


def start_rollout_actors(spec: JobSpec, ctx: WorkerContext, say=print) -> tuple[RemoteSampler, list]:
    """Rank 0 starts the actors and waits until their models loaded; every learner gets their handles.
    Returns the sampler and the actors this process owns (to end when training ends)."""
    import ray

    rollout = spec.method.grpo.rollout  # type: ignore[union-attr]
    owned: list = []
    names: list[str] | None = None
    if ctx.is_main:
        resources = rollout_actor_resources(spec)
        actor_class = ray.remote(RolloutWorker)
        custom = {kind: amount for kind, amount in resources.items() if kind not in ("CPU", "GPU")}
        options = {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0), "resources": custom,
                   "max_concurrency": ctx.world_size + 1,  # learners' requests wait for their weights side by side
                   "scheduling_strategy": "SPREAD" if rollout.workers > 1 else "DEFAULT"}  # not in the workers' group
        tag = uuid.uuid4().hex[:8]
        names = [f"ftcluster-rollout-{tag}-{index}" for index in range(rollout.workers)]
        owned = [actor_class.options(name=name, **options).remote(
                     spec.model_dump(mode="json"), max(1, int(resources["CPU"])), "GPU" in resources) for name in names]
        nodes = wait_until_ready(owned, spec, resources)
        say(f"rollout: {rollout.workers} actor(s) on {len(set(nodes))} node(s) sample the completions; weights "
            f"pushed every {rollout.sync_every} rollout(s)")
    names = share_from_main(ctx, spec, names)
    actors = owned or [ray.get_actor(name) for name in names or []]
    return RemoteSampler(actors, spec, ctx), owned


def wait_until_ready(actors: list, spec: JobSpec, resources: dict[str, float]) -> list[str]:
    """The actors' nodes, once every model loaded; one line if they cannot be placed in time."""
    import ray
    from ray.exceptions import GetTimeoutError

    timeout = spec.scaling.placement_timeout_s
    try:
        return ray.get([actor.ready.remote() for actor in actors], timeout=timeout)
    except GetTimeoutError:
        one = ", ".join(f"{amount:g} {kind}" for kind, amount in resources.items())
        raise FtError(f"method.grpo.rollout: {len(actors)} rollout actors ({one} each) did not start within "
                      f"{timeout:g} s (scaling.placement_timeout_s); free or add resources, or lower "
                      "rollout.workers / rollout.cpus_per_worker") from None


def share_from_main(ctx: WorkerContext, spec: JobSpec, value: Any) -> Any:
    """Rank 0's `value` on every learner (a broadcast over the training group)."""
    if ctx.world_size == 1:
        return value
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", ctx.local_rank) if spec.scaling.use_gpu and dist.get_backend() == "nccl" else None
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def end_rollout_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)
