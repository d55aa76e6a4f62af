"""Warp specialisation for the Mosaic GPU row-gathering kernel (`indexed_forward.py`): a producer warpgroup that
only copies key chunks into the ring, compute warpgroups that only multiply, and FlashAttention-3's ping-pong
schedule between two compute warpgroups. The kernel passes its own closures in (issue a step's copies, wait until a
gathered step has landed, attend a chunk, finish); this module only orders them.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hyperattn_jax.kernels.mosaic_gpu.row_copies import announce_gathered, wait_gathers


def rendezvous(schedule, while_waiting=None):
    """Both compute warpgroups arrive on the ping-pong `schedule` barrier and wait for each other (running
    `while_waiting` in between)."""
    plgpu.barrier_arrive(schedule)
    if while_waiting is not None:
        while_waiting()
    plgpu.barrier_wait(schedule)


def gather_and_compute(steps, tiles, issue, attend, finish, wait_landed, landed, consumed, k_bar, *, stages,
                       warpgroups, gather_queries, start, interpret, schedule=None):  # fmt: skip
    """Warp specialisation (FlashAttention-3's layout): the last warpgroup only copies key chunks into the ring
    (cp.async gathers and TMA), the `warpgroups` before it only multiply. The producer never waits for its own
    copies: a gathered chunk's copies arrive on the slot's gather barrier as they land (`wait_landed`), so up to
    `stages` chunks are in flight; it waits only for a slot to come back, which each computing warpgroup hands back
    on `consumed` once its products are done. With a ping-pong `schedule` (2 compute warpgroups) the second starts
    one hand-over late, so each one's softmax runs while the other's products do (FlashAttention-3), and the
    producer gives registers up to them."""
    warpgroup = lax.axis_index("wg")
    registers = schedule is not None and not interpret  # 2 x 224 + 56 = 3 x 168, the 384 threads' share

    @pl.when(warpgroup == warpgroups)
    def _gather():
        if registers:
            plgpu.set_max_registers(56, action="decrease")
        for step in range(len(steps)):
            slot = step % stages
            if step >= stages:  # the slot's products of step - stages are done
                with jax.named_scope("wait_slot"):
                    plgpu.barrier_wait(consumed.at[slot])
            with jax.named_scope("issue"):
                issue(step, slot)
            if tiles[steps[step][0]].indexed:
                announce_gathered(landed, slot, interpret=interpret)

    @pl.when(warpgroup < warpgroups)
    def _compute():
        if registers:
            plgpu.set_max_registers(224, action="increase")
        with jax.named_scope("issue"):
            gather_queries()
        with jax.named_scope("wait"):
            wait_gathers(0, interpret=interpret)
        state = start()
        if schedule is not None:
            pl.when(warpgroup == 1)(functools.partial(rendezvous, schedule))
        for step in range(len(steps)):
            slot = step % stages
            with jax.named_scope("wait"):
                if tiles[steps[step][0]].indexed:
                    wait_landed(step)
                else:
                    plgpu.barrier_wait(k_bar.at[slot])
            with jax.named_scope("attend"):
                state = attend(state, step)
            if step + stages < len(steps):
                plgpu.barrier_arrive(consumed.at[slot])
        if schedule is not None:  # the first warpgroup's last hand-over, matching the second's first
            pl.when(warpgroup == 0)(functools.partial(rendezvous, schedule))
        with jax.named_scope("store"):
            finish(state)
