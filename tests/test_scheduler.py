"""The scheduler on the real engine: budgets, decodes first, priorities, preemption, abort."""

from __future__ import annotations

from conftest import assert_pool_whole, random_prompts

from engine import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def test_step_budget_puts_decodes_first_then_prefill_chunks(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4, max_num_tokens=10)
    engine = llm.engine
    a, b = random_prompts([6, 30], seed=1)
    engine.add_request(a, GREEDY, request_id="a")
    engine.step()  # a's whole prompt (6 tokens) fits the 10-token budget
    engine.add_request(b, GREEDY, request_id="b")
    batch = engine.scheduler.schedule()
    assert [(r.request_id, n) for r, n in batch.decodes] == [("a", 1)]
    assert [(r.request_id, n) for r, n in batch.prefills] == [("b", 9)]  # the rest of the budget
    chunks = [engine.seq_chunk(r, n) for r, n in batch.scheduled]
    logits = engine.runner.run(chunks, len(batch.decodes))
    assert logits.shape[0] == 1  # only a samples: b's chunk is mid-prompt
    engine.scheduler.update(batch)
    assert engine.requests["b"].num_computed_tokens == 9


def test_max_num_seqs_caps_the_running_set(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4, max_num_seqs=2)
    for i, p in enumerate(random_prompts([3, 3, 3], seed=2)):
        llm.engine.add_request(p, GREEDY, request_id=f"r{i}")
    llm.engine.step()
    state = llm.state()
    assert [r.request_id for r in state.running] == ["r0", "r1"]
    assert [r.request_id for r in state.waiting] == ["r2"]


def test_priority_runs_first_then_fcfs(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4, max_num_seqs=1)
    prompts = random_prompts([3, 3, 3], seed=3)
    llm.engine.add_request(prompts[0], GREEDY, request_id="late", priority=5)
    llm.engine.add_request(prompts[1], GREEDY, request_id="first", priority=0)
    llm.engine.add_request(prompts[2], GREEDY, request_id="second", priority=0)
    order = []
    while llm.engine.has_unfinished():
        order += [o.request_id for o in llm.engine.step() if o.finished]
    assert order == ["first", "second", "late"]


def test_preemption_picks_the_newest_and_it_resumes(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=2, num_kv_blocks=12)
    engine = llm.engine
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    requests = [
        engine.add_request(p, params, request_id=f"r{i}")
        for i, p in enumerate(random_prompts([6, 6, 6], seed=4))
    ]
    first_preempted = None
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        if first_preempted is None:
            first_preempted = next((r.request_id for r in requests if r.num_preemptions), None)
    assert first_preempted == "r2"  # the newest goes first
    assert requests[0].num_preemptions == 0  # the oldest is never the victim
    assert sorted(done) == ["r0", "r1", "r2"] and all(len(v) == 10 for v in done.values())
    assert_pool_whole(llm)


def test_abort_frees_blocks_at_once(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4)
    engine = llm.engine
    engine.add_request(random_prompts([20], seed=5)[0], GREEDY, request_id="x")
    engine.step()
    assert len(engine.kv.block_ids("x")) == 5
    assert engine.abort("x")
    assert llm.state().kv_blocks_used == 0
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("x", "abort")]
    assert not engine.abort("x")
    assert_pool_whole(llm)


def test_state_snapshot_describes_the_batch(llama_checkpoint):
    llm = LLM(str(llama_checkpoint), block_size=4, max_num_tokens=16)
    engine = llm.engine
    for i, p in enumerate(random_prompts([10, 12], seed=6)):
        engine.add_request(p, GREEDY, request_id=f"s{i}")
    engine.step()
    state = llm.state()
    assert state.last_step.prefill_tokens == 16 and state.last_step.decode_tokens == 0
    assert [r.request_id for r in state.running] == ["s0", "s1"]
    s0 = state.running[0]
    assert s0.prompt_len == 10 and s0.generated == 1 and s0.blocks_held == 3
    assert state.kv_blocks_used == 3 + 2  # s1 has 6 of its 12 tokens in so far
    owners = [v for v in state.block_map if v >= 0]
    assert owners.count(0) == 3 and owners.count(1) == 2
    assert state.kv_blocks_used + state.kv_blocks_free + state.kv_blocks_cached_free == (
        state.kv_blocks_total
    )
