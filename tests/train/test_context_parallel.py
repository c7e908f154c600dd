"""Context parallelism on real gloo ranks: CP=2 gives the loss and every gradient of the unsplit model for
every family and pattern letter under ZeRO-2 and ZeRO-3, the config checks stop a bad split before any process
group, and a model whose heads Ulysses cannot split trains with CP=4."""

import sys

import pytest
from harness import ROOT, TINY, ZERO3_PARTITION_ALL

from train.config import ConfigError, load_config

sys.path.insert(0, str(ROOT / "tests" / "train"))
from test_sequence_parallel import SPLITS, assert_matches_unsplit, assert_resumes_exactly, run_sp  # noqa: E402
from test_sequence_parallel import case as sp_case  # noqa: E402

pytestmark = pytest.mark.slow

# Every family and letter: attention (A), sliding window (W, a window that reaches across pieces), mLSTM (X),
# Mamba (M), Mamba-2 (m), HGRN2 (H), MoM (R), BST (B), SCOUT (S), Gated DeltaNet (G), and one hybrid of all.
FAMILIES = ["transformer", "xlstm", "mamba", "mamba2", "hgrn2", "mom", "bst", "scout", "gated_deltanet",
            "hybrid-every-mixer"]
CASES = {name: SPLITS[name] for name in FAMILIES}
CASES["sliding_window"] = ("transformer", ["model.pattern=W", "model.sliding_window.window=16"])
# 48 tokens in 2 pieces of 24: not a multiple of any family's chunk (16, 32, 64).
SEQ_LEN = 48


def case(name: str, zero_stage: int):
    return sp_case(name, zero_stage, CASES)


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory) -> dict[str, dict]:
    cases = {f"{name}-{stage}": case(name, stage) for stage in (2, 3) for name in CASES}
    cases |= {f"packed-hybrid-every-mixer-{stage}": case("hybrid-every-mixer", stage) for stage in (2, 3)}
    return run_sp(cases, tmp_path_factory.mktemp("cp"), split="parallel.context_parallel_size=2", seq_len=SEQ_LEN)


@pytest.mark.parametrize("zero_stage", [2, 3])
@pytest.mark.parametrize("name", CASES)
def test_cp2_matches_the_unsplit_model(name, zero_stage, cp_results):
    config, overrides = case(name, zero_stage)
    assert_matches_unsplit(None, zero_stage, cp_results[f"{name}-{zero_stage}"], packed=False, seq_len=SEQ_LEN,
                           config=(config, overrides))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_cp2_on_packed_documents_matches_the_unsplit_model(zero_stage, cp_results):
    # Every letter on packed documents (sp_worker.py PACKED_CU_SEQLENS: in each row a document crosses the cut),
    # against the unsplit packed model; each family's boundary cases at CP=4 are in test_context_parallel_math.py.
    config, overrides = case("hybrid-every-mixer", zero_stage)
    assert_matches_unsplit(None, zero_stage, cp_results[f"packed-hybrid-every-mixer-{zero_stage}"], packed=True,
                           seq_len=SEQ_LEN, config=(config, overrides))


def test_bad_context_parallel_configs_stop_before_any_process_group():
    cp2 = "parallel.context_parallel_size=2"
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        load_config(TINY / "xlstm.yaml", [cp2], world_size=3)
    with pytest.raises(ConfigError, match="data.seq_len=127"):
        load_config(TINY / "xlstm.yaml", [cp2, "data.mode=concat", "data.seq_len=127", "data.tokens_per_step=2032"],
                    world_size=2)
    with pytest.raises(ConfigError, match="short convolution needs the previous piece's last 3 inputs"):
        load_config(TINY / "mamba2.yaml", ["parallel.context_parallel_size=4", "data.mode=concat", "data.seq_len=8",
                                           "data.tokens_per_step=32", "data.micro_batch_size=1"], world_size=4)


def test_two_heads_train_with_cp4_where_ulysses_cannot_split_them(train):
    # 2 mLSTM heads: Ulysses over 4 ranks is refused; CP=4 cuts each 128-token sequence into 4 pieces of 32
    # (the middle pieces pass their predecessors' state on, through the carry).
    with pytest.raises(ConfigError, match="model.n_heads=2, not divisible by parallel.sequence_parallel_size=4"):
        load_config(TINY / "xlstm.yaml", ["model.n_heads=2", "parallel.sequence_parallel_size=4"], world_size=4)
    run = train(TINY / "xlstm.yaml", "model.n_heads=2", "parallel.context_parallel_size=4", "schedule.steps=30",
                nproc=4)
    assert "context parallelism over 4 ranks" in run.output
    assert run.losses[-1] < run.losses[0] - 0.5, run.losses


@pytest.mark.parametrize("split", ["parallel.context_parallel_size=2", "parallel.sequence_parallel_size=2"])
def test_two_replicas_of_a_split_with_accumulation_match_the_unsplit_model(split, tmp_path):
    # 4 ranks = 2 data-parallel replicas x a split of 2, 2 micro batches of 2 rows each per replica: the loss
    # scaling over replicas and accumulation (DeepSpeed divides by both) and the sum over the split's ranks.
    # The every-letter hybrid under ZeRO-2, and the xLSTM under ZeRO-3 with every parameter partitioned.
    cases = {"hybrid-every-mixer-2": case("hybrid-every-mixer", 2), "xlstm-3": case("xlstm", 3)}
    accumulate = ["data.tokens_per_step=2048"]  # 4 x 128 tokens x 2 replicas x 2 micro batches
    cases = {name: (config, [*overrides, *accumulate]) for name, (config, overrides) in cases.items()}
    results = run_sp(cases, tmp_path, split=split, nproc=4, seq_len=SEQ_LEN, micro_batches=2)
    for name, (config, overrides) in cases.items():
        assert_matches_unsplit(None, int(name[-1]), results[name], packed=False, seq_len=SEQ_LEN,
                               config=(config, overrides), rows=8)


def test_cp2_run_resumes_from_its_last_checkpoint_exactly(train, tmp_path):
    # Mamba-2 (a state and a convolution halo cross the ranks) under ZeRO-3 with every parameter partitioned;
    # the in-training eval runs unsplit at step 3 (every rank scores whole held-out sequences).
    overrides = ["parallel.context_parallel_size=2", "parallel.zero_stage=3", ZERO3_PARTITION_ALL,
                 "parallel.precision=fp32", "schedule.steps=6", "schedule.warmup_steps=2", "checkpoint.every=3",
                 "logging.every=1", "eval.every=3", "eval.max_tokens=512"]
    full = assert_resumes_exactly(train, TINY / "mamba2.yaml", overrides)
    (record, *_) = [r for r in full.records if "eval/ppl@128" in r]
    assert record["step"] == 3 and record["eval/ppl@128"] < 2048


def test_context_parallel_bench_measures_the_analytic_bytes():
    sys.path.insert(0, str(ROOT / "bench"))
    import context_parallel as bench

    checks = bench.byte_checks(shapes={"tiny xLSTM": ("tiny", "xlstm"), "tiny Mamba-2": ("tiny", "mamba2")})
    kinds = {what.split(" T=")[0] for _, what, _, _ in checks}
    assert {"state passing CP=2", "state passing CP=8"} <= kinds and any(k.startswith("Ulysses") for k in kinds)
    for shape, what, got, want in checks:
        assert got == want > 0, (shape, what)


def test_cp2_times_sp2_on_four_ranks_matches_the_unsplit_model(tmp_path):
    # Ulysses inside each of the 2 pieces: the mLSTM (and HGRN2, Gated DeltaNet in the hybrid) pass the state of
    # their heads' share between pieces, attention gathers keys and values across pieces inside
    # DistributedAttention; Mamba-2 (and Mamba, MoM, BST, SCOUT in the hybrid) run gathered over the 4 ranks.
    cases = {"xlstm-2": case("xlstm", 2), "mamba2-2": case("mamba2", 2),
             "hybrid-every-mixer-2": case("hybrid-every-mixer", 2), "hybrid-every-mixer-3": case("hybrid-every-mixer", 3),
             "packed-hybrid-every-mixer-2": case("hybrid-every-mixer", 2)}
    cases["mamba2-2"] = (cases["mamba2-2"][0], [*cases["mamba2-2"][1], "model.mamba2.n_groups=2"])
    results = run_sp(cases, tmp_path, split="parallel.context_parallel_size=2", nproc=4, seq_len=64,
                     extra=["parallel.sequence_parallel_size=2"])
    for name, (config, overrides) in cases.items():
        assert_matches_unsplit(None, int(name[-1]), results[name], packed=name.startswith("packed-"), seq_len=64,
                               config=(config, overrides))


def test_cp4_matches_the_unsplit_model(tmp_path):
    # 4 pieces of 16: the middle pieces run from the scan of their predecessors' states and transitions (a
    # matrix for the delta rule), their convolutions from the halo; MoM's state is relayed through 3 rounds.
    names = ["xlstm", "mamba", "mamba2", "hgrn2", "gated_deltanet", "mom", "sliding_window"]
    # On packed documents (PACKED_CU_SEQLENS), the second row's document runs through the middle pieces.
    cases = {f"{name}-2": case(name, 2) for name in names} | {"hybrid-every-mixer-3": case("hybrid-every-mixer", 3),
                                                              "packed-hybrid-every-mixer-3": case("hybrid-every-mixer", 3)}
    results = run_sp(cases, tmp_path, split="parallel.context_parallel_size=4", nproc=4, seq_len=64)
    for name, (config, overrides) in cases.items():
        assert_matches_unsplit(None, int(name[-1]), results[name], packed=name.startswith("packed-"), seq_len=64,
                               config=(config, overrides))
