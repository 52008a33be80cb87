#!/usr/bin/env bash
# Start the brokers the test suite needs, idempotently, and fail loudly if one does not come up.
# RabbitMQ (with its AMQP 1.0 plugin) on 127.0.0.1:5672, Redis on 127.0.0.1:6379 and NATS with
# JetStream on 127.0.0.1:4222.
set -euo pipefail

wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "services.sh: $1 did not answer on 127.0.0.1:$2 within $3s" >&2
  return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 6379; then
  command -v redis-server >/dev/null || { echo "services.sh: redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
wait_port redis 6379 30

if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || { echo "services.sh: rabbitmq-server is not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
  rabbitmq-server -detached
fi
wait_port rabbitmq 5672 90
# The AMQP 1.0 driver needs this plugin; enabling an enabled plugin is a no-op.
if ! grep -q rabbitmq_amqp1_0 /etc/rabbitmq/enabled_plugins 2>/dev/null \
   || ! rabbitmq-plugins is_enabled rabbitmq_amqp1_0 >/dev/null 2>&1; then
  rabbitmq-plugins enable rabbitmq_amqp1_0 >/dev/null
fi
rabbitmqctl await_startup >/dev/null

if ! port_open 4222; then
  command -v nats-server >/dev/null || { echo "services.sh: nats-server is not installed (apt-get install nats-server)" >&2; exit 1; }
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
fi
wait_port nats 4222 30
echo "services.sh: redis on :6379, rabbitmq on :5672 (amqp1_0 plugin enabled) and nats on :4222 are up"
