#!/usr/bin/env python3
"""Ordinary broker clients, as applications next to Courier use them: pika for
RabbitMQ, confluent-kafka (librdkafka, but not Courier's) for Kafka, boto3 for SQS.

The interop tests (tests/tests/interop.rs) run one command at a time:

    clients.py pika-declare-send URL QUEUE BODY   queue_declare(queue=QUEUE) with pika's defaults, then publish BODY
    clients.py pika-send URL QUEUE BODY           publish BODY alone: no properties, no headers
    clients.py pika-receive URL QUEUE             basic_get one message, ack it, print it as JSON
    clients.py kafka-send BOOTSTRAP TOPIC BODY    produce BODY alone: no key, no headers
    clients.py kafka-receive BOOTSTRAP TOPIC GROUP  poll one record, commit it, print it as JSON
    clients.py sqs-send ENDPOINT REGION QUEUE BODY  send_message with only a MessageBody
    clients.py sqs-receive ENDPOINT REGION QUEUE  receive one message as a Lambda handler written
                                                  in Python would, delete it, print it as JSON

Each receive waits up to 30 seconds and fails (exit 1) when nothing arrives.
`scripts/brokers up` installs the three clients (pip install pika confluent-kafka boto3).
"""
import json
import sys
import time

DEADLINE = 30


def pika_channel(url):
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def pika_send(url, queue, body, declare):
    connection, channel = pika_channel(url)
    if declare:
        channel.queue_declare(queue=queue)  # the client's defaults: a transient classic queue
    channel.basic_publish(exchange="", routing_key=queue, body=body.encode(), mandatory=True)
    connection.close()


def pika_receive(url, queue):
    connection, channel = pika_channel(url)
    start = time.monotonic()
    while time.monotonic() - start < DEADLINE:
        method, props, body = channel.basic_get(queue=queue)
        if method is None:
            time.sleep(0.2)
            continue
        channel.basic_ack(method.delivery_tag)
        headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (props.headers or {}).items()}
        print(json.dumps({
            "body": body.decode(),
            "headers": headers,
            "message_id": props.message_id,
            "content_type": props.content_type,
        }))
        connection.close()
        return
    sys.exit(f"pika: nothing arrived on {queue} within {DEADLINE} s")


def kafka_send(bootstrap, topic, body):
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    errors = []
    producer.produce(topic, value=body.encode(), on_delivery=lambda err, _msg: err and errors.append(err))
    if producer.flush(DEADLINE) != 0 or errors:
        sys.exit(f"confluent-kafka: not delivered: {errors}")


def kafka_receive(bootstrap, topic, group):
    from confluent_kafka import Consumer

    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "session.timeout.ms": 6000,
    })
    consumer.subscribe([topic])
    start = time.monotonic()
    try:
        while time.monotonic() - start < DEADLINE:
            record = consumer.poll(1.0)
            if record is None:
                continue
            if record.error():
                sys.exit(f"confluent-kafka: {record.error()}")
            consumer.commit(record, asynchronous=False)
            headers = {k: (v.decode() if v is not None else None) for k, v in (record.headers() or [])}
            print(json.dumps({
                "body": record.value().decode(),
                "headers": headers,
                "key": record.key().decode() if record.key() else None,
            }))
            return
    finally:
        consumer.close()
    sys.exit(f"confluent-kafka: nothing arrived on {topic} within {DEADLINE} s")


def sqs_client(endpoint, region):
    import boto3

    return boto3.client("sqs", endpoint_url=endpoint, region_name=region,
                        aws_access_key_id="courier-test", aws_secret_access_key="courier-test")


def sqs_send(endpoint, region, queue, body):
    sqs = sqs_client(endpoint, region)
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    print(json.dumps({"message_id": sqs.send_message(QueueUrl=url, MessageBody=body)["MessageId"]}))


def sqs_receive(endpoint, region, queue):
    sqs = sqs_client(endpoint, region)
    url = sqs.get_queue_url(QueueName=queue)["QueueUrl"]
    start = time.monotonic()
    while time.monotonic() - start < DEADLINE:
        out = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=2,
                                  MessageAttributeNames=["All"])
        for message in out.get("Messages", []):
            sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
            attributes = {k: v.get("StringValue") for k, v in message.get("MessageAttributes", {}).items()}
            print(json.dumps({"body": message["Body"], "headers": attributes, "message_id": message["MessageId"]}))
            return
    sys.exit(f"boto3: nothing arrived on {queue} within {DEADLINE} s")


def main(argv):
    commands = {
        "pika-declare-send": lambda url, q, body: pika_send(url, q, body, declare=True),
        "pika-send": lambda url, q, body: pika_send(url, q, body, declare=False),
        "pika-receive": pika_receive,
        "kafka-send": kafka_send,
        "kafka-receive": kafka_receive,
        "sqs-send": sqs_send,
        "sqs-receive": sqs_receive,
    }
    if len(argv) < 2 or argv[1] not in commands:
        sys.exit(__doc__)
    commands[argv[1]](*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
