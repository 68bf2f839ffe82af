import threading
from pathlib import Path

import pyro
import pytest
import torch
import tqdm

# tqdm's default write lock includes a multiprocessing RLock, a semaphore that forked processes share:
# a forked test process (each mutant of tools/mutants.py runs in one) stopped while it holds it would
# block every later bar of every other fork. The tests create bars in this process only.
tqdm.tqdm.set_lock(threading.RLock())

#: The slow tests, by ``file::function`` (every parametrization) or ``file`` (all its tests), and why:
#: ``pytest -m "not slow"`` (``make test-fast``) leaves them out, ``make test`` runs them. Slow are the tests that
#: spawn processes (the CLI through a subprocess, torchrun workers), run the docs examples or the demo, and the
#: long fits and trainings (over about 10 s on 2 cores). A module may also mark itself (``pytestmark =
#: pytest.mark.slow``).
SLOW = {
    "test_cli_demo.py": "the demo, and the CLI through subprocesses",
    "test_checkpoint.py::test_sigkill_mid_epoch_then_resume_is_bit_identical": "subprocesses: worker, SIGKILL",
    "test_cli_train.py::test_a_config_file_is_validated_before_anything_is_written": "CLI subprocess",
    "test_contract.py::test_every_gaussian_guide_recovers_the_exact_posterior": "15 conjugate fits of 600 steps",
    "test_distributed.py::test_torchrun_two_processes_equal_one_process_on_the_global_batch": "torchrun",
    "test_docs.py::test_examples_run": "docs examples (training included)",
    "test_laplace_memory.py::test_peak_rss_of_a_fit_stays_near_two_m_by_m_matrices": "fit in a subprocess",
    "test_own_data.py::test_help_imports_no_torch_and_starts_fast": "CLI subprocesses",
    "test_reliability.py::test_a_run_directory_locked_by_another_process_is_refused": "subprocess holds a lock",
    "test_reliability.py::test_concurrent_writers_one_wins_and_the_other_is_refused": "two CLI subprocesses",
    "test_reliability.py::test_a_killed_writer_leaves_no_lock_and_its_run_resumes_bit_identically": "CLI subprocess",
    # long trainings and fits, measured with OMP_NUM_THREADS=1 on 2 shared cores
    "test_baselines.py::test_every_method_runs_on_tiny_digits_and_seeds_summarize": "every method trained, 17 s",
    "test_contract.py::test_cli_trains_and_diagnoses_an_autoguide_run_with_per_example_sampling": "train+diagnose, 30 s",
    "test_diagnostics.py::test_diagnose_command_loads_a_run_and_writes_report_and_figures": "diagnose CLI, 20 s",
    "test_objectives.py::test_vectorized_particles_average_the_loss": "12 s",
    "test_own_data.py::test_temperature_scaling_minimises_nll_like_a_grid_search": "grid search, 32 s",
    "test_projected.py::test_no_underfitting_on_digits": "trains on digits, 54 s",
    "test_projected.py::test_trace_estimate_matches_nullity": "15 s",
}


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Mark the tests named in :data:`SLOW`; a name that is no test of its (collected) file is an error."""
    modules = {}
    for item in items:
        modules.setdefault(item.path.name, getattr(item, "module", None))
        if {item.path.name, f"{item.path.name}::{getattr(item, 'originalname', item.name)}"} & SLOW.keys():
            item.add_marker(pytest.mark.slow)

    def missing(key: str) -> bool:
        file, _, name = key.partition("::")
        module = modules.get(file)
        return not (Path(__file__).parent / file).is_file() or bool(name and module and not hasattr(module, name))

    stale = [key for key in SLOW if missing(key)]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist: {stale}")


@pytest.fixture(autouse=True)
def _seed_and_clean():
    """Every test starts from a fixed seed and an empty Pyro param store."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
