"""The same path on RabbitMQ: HTTP submit → quorum queue → Celery worker → job record in Redis → HTTP poll."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from kombu import Connection, Queue
from kombu.exceptions import OperationalError

from inferq.config import Settings
from inferq.producers.demo import fraud_example
from inferq.protocol.celery_config import celery_config
from inferq.protocol.registry import load_registry
from tests.integration.conftest import Stack

pytestmark = pytest.mark.slow
_JOB_TIMEOUT_S = 300.0


def _wait_succeeded(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as client:
        job = client.result(job_id, wait_s=_JOB_TIMEOUT_S)
    assert job["status"] == "succeeded", job
    return job


def _queues(stack: Stack) -> dict[str, Queue]:
    settings = Settings(**_settings_from(stack.env))
    conf = celery_config(settings, load_registry(settings.registry_path))
    return {queue.name: queue for queue in conf["task_queues"]}


def _settings_from(env: dict[str, str]) -> dict[str, str]:
    return {
        "redis_url": env["INFERQ_REDIS_URL"],
        "broker_url": env["INFERQ_BROKER_URL"],
        "registry_path": env["INFERQ_REGISTRY_PATH"],
    }


def test_an_image_job_succeeds_over_rabbitmq(stack_amqp: Stack) -> None:
    with stack_amqp.client() as client:
        job = _wait_succeeded(stack_amqp, client.submit("chest-xray", stack_amqp.samples[0]))
    assert len(job["result"]["findings"]) == 14 and job["attempts"] == 1


def test_a_tensor_job_succeeds_over_rabbitmq(stack_amqp: Stack) -> None:
    with stack_amqp.client() as client:
        job = _wait_succeeded(stack_amqp, client.submit("fraud", inputs=fraud_example(rows=4)))
    assert job["result"]["outputs"][0]["shape"] == [4, 1]


def test_unknown_model_is_404_over_rabbitmq(stack_amqp: Stack) -> None:
    response = httpx.post(
        f"{stack_amqp.api_url}/v1/models/nope/jobs", files={"file": ("a.png", b"x")}, headers=stack_amqp.auth
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_model"


def test_a_job_without_a_consumer_waits_in_its_queue_and_can_be_cancelled(stack_amqp: Stack) -> None:
    with stack_amqp.client() as client:
        job_id = client.submit("fraud-idle", inputs=fraud_example(rows=1))
        # The depth comes from RabbitMQ (a passive declare), not from Redis lists.
        depths = {m["name"]: m["queue_depth"] for m in client.models()}
        assert depths["fraud-idle"] >= 1
        assert client.status(job_id)["status"] == "queued"
        assert client.cancel(job_id)["status"] == "cancelled"
        assert client.status(job_id)["status"] == "cancelled"


def test_model_queues_are_quorum_queues_with_a_delivery_limit(stack_amqp: Stack) -> None:
    # Given the queue the worker declared, when it is declared again with the same arguments it is accepted, and as a
    # classic queue otherwise alike RabbitMQ refuses (a redeclare with different arguments is a PRECONDITION_FAILED).
    with Connection(stack_amqp.env["INFERQ_BROKER_URL"]) as connection:
        declared = _queues(stack_amqp)["fraud"]
        assert declared.queue_arguments["x-delivery-limit"] == Settings().broker_delivery_limit
        assert declared.queue_arguments["x-dead-letter-routing-key"] == "fraud.dead"
        declared(connection.channel()).declare()
        arguments = {**declared.queue_arguments, "x-queue-type": "classic"}
        classic = Queue("fraud", queue_arguments=arguments)(connection.channel())
        with pytest.raises((*connection.channel_errors, OperationalError), match="x-queue-type"):
            classic.queue_declare()


def test_a_message_delivered_too_often_is_dead_lettered(stack_amqp: Stack) -> None:
    # Given a model queue that no worker of this stack consumes (fraud-celery) and a message on it
    queue = _queues(stack_amqp)["fraud-celery"]
    limit = Settings().broker_delivery_limit
    with Connection(stack_amqp.env["INFERQ_BROKER_URL"]) as connection:
        channel = connection.channel()
        bound = queue(channel)
        bound.declare()
        with connection.Producer(channel) as producer:
            producer.publish(
                {"poison": True}, exchange=queue.exchange, routing_key=queue.routing_key, serializer="json"
            )
        # When a consumer gives it back every time (as a worker killed by the job would)
        for _ in range(limit + 1):
            message = _get(bound)
            if message is None:
                break
            message.requeue()
        # Then it left the queue for the model's dead-letter queue, body intact
        assert _get(bound) is None
        dead = Queue("fraud-celery.dead", queue_arguments={"x-queue-type": "quorum"})(channel)
        dead_message = _get(dead)
        assert dead_message is not None and dead_message.payload == {"poison": True}
        dead_message.ack()


def _get(queue: Queue) -> Any:
    """One message, waiting briefly: a requeued message reappears after a short delay on quorum queues."""
    for _ in range(50):
        message = queue.get(no_ack=False)
        if message is not None:
            return message
        time.sleep(0.1)
    return None
