import pytest

from gptforge.train.anomaly import WARMUP_STEPS, Anomaly, AnomalyGuard


def test_non_finite_values_are_anomalies():
    guard = AnomalyGuard()
    with pytest.raises(Anomaly, match="loss became nan"):
        guard.check(float("nan"), 1.0)
    with pytest.raises(Anomaly, match="gradient norm became inf"):
        guard.check(2.0, float("inf"))
    AnomalyGuard(check_grad_norm=False).check(2.0, float("inf"))  # fp16 scaling: routine


def test_spikes_are_judged_against_the_running_average_after_warmup():
    guard = AnomalyGuard(spike_threshold=2.0)
    guard.check(100.0, 1.0)  # early steps are never spikes
    for _ in range(WARMUP_STEPS):
        guard.accept(3.0)
    guard.check(5.9, 1.0)
    with pytest.raises(Anomaly, match="spiked to 6.5"):
        guard.check(6.5, 1.0)
    restored = AnomalyGuard(spike_threshold=2.0)
    restored.load_state_dict(guard.state_dict())
    with pytest.raises(Anomaly):
        restored.check(6.5, 1.0)

