"""The status app served for real by uvicorn on a free loopback port."""
import httpx

from services.status import JobStatus, StatusServer, prometheus_text


def test_status_endpoints_serve_the_driver_state():
    status = JobStatus("t", total_steps=10)
    server = StatusServer(status, "127.0.0.1", 0).start()
    try:
        status.update(state="training", step=3, weight_version=1,
                      buffer={"rows_by_source": {"student": 5, "teacher": 7, "dataset": 0}})
        status.record_loss(3, {"loss": 0.25})
        with httpx.Client(base_url=server.url, timeout=5) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            s = c.get("/status").json()
            assert (s["step"], s["weight_version"], s["state"]) == (3, 1, "training")
            assert s["buffer"]["rows_by_source"]["teacher"] == 7
            assert s["losses"] == {"loss": 0.25}
            metrics = c.get("/metrics").text
            assert 'ammd_buffer_rows{source="student"} 5.0' in metrics
            assert "ammd_loss_loss 0.25" in metrics
            assert "<canvas" in c.get("/").text
    finally:
        server.stop()


def test_prometheus_text_skips_non_numbers():
    text = prometheus_text({"step": 2, "name": "x", "losses": {"loss": float("nan")}})
    assert "ammd_step 2.0" in text and "name" not in text
