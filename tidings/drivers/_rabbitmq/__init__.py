"""What ``rabbit://`` (AMQP 0-9-1) and ``amqp://`` (AMQP 1.0) share because both speak to
RabbitMQ: the oslo.messaging queue model and its x-arguments, the TLS options, broker hosts."""
