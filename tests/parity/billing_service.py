"""A billing service written for oslo.messaging 18, as an OpenStack service author writes one.

The parity suite runs it twice: as it is, and with its import line changed to
``import tidings as oslo_messaging``, fed by the same real oslo.messaging notifiers, and checks
that both runs see and emit the same. It prints one JSON line per notification it handles.
"""
import datetime
import json
import sys
import threading

import oslo_messaging  # the import line
from oslo_config import cfg
from oslo_context import context as oslo_context

CONF = cfg.CONF
CONF.register_opts([cfg.StrOpt('pool', default='billing'),
                    cfg.IntOpt('expected', default=1)], group='billing')
seen, done, lock = [], threading.Event(), threading.Lock()
BILLED_AT = datetime.datetime(2024, 1, 2, 3, 4, 5, 123456)


class RequestContextSerializer(oslo_messaging.Serializer):
    def __init__(self):
        self._base = oslo_messaging.NoOpSerializer()

    def serialize_entity(self, ctxt, entity):
        return self._base.serialize_entity(ctxt, entity)

    def deserialize_entity(self, ctxt, entity):
        return self._base.deserialize_entity(ctxt, entity)

    def serialize_context(self, ctxt):
        return ctxt.to_dict()

    def deserialize_context(self, ctxt):
        return oslo_context.RequestContext.from_dict(ctxt)


def record(endpoint, ctxt, publisher_id, event_type, payload, metadata):
    with lock:
        seen.append(payload['id'])
        print(json.dumps({'endpoint': endpoint, 'ctxt': [type(ctxt).__name__, ctxt.user_id,
                          ctxt.project_id, ctxt.request_id, ctxt.auth_token],
                          'publisher_id': publisher_id, 'event_type': event_type,
                          'payload': payload, 'metadata': sorted(metadata)}), flush=True)
        if len(seen) >= CONF.billing.expected:
            done.set()


class Instances:
    filter_rule = oslo_messaging.NotificationFilter(event_type=r'^compute\.instance\.')

    def __init__(self, notifier):
        self.notifier = notifier

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self.notifier.info(ctxt, 'billing.charge', {'instance': payload['id'],
                                                    'billed_at': BILLED_AT, 'tags': {'vm'}})
        record('instances', ctxt, publisher_id, event_type, payload, metadata)
        return oslo_messaging.NotificationResult.HANDLED


class Volumes:
    filter_rule = oslo_messaging.NotificationFilter(publisher_id=r'^volume\.',
                                                    payload={'state': '^available$'})
    requeued = set()

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        if payload.get('requeue_once') and payload['id'] not in self.requeued:
            self.requeued.add(payload['id'])
            return oslo_messaging.NotificationResult.REQUEUE
        record('volumes', ctxt, publisher_id, event_type, payload, metadata)

    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        record('volume-errors', ctxt, publisher_id, event_type, payload, metadata)


def main():
    CONF(sys.argv[1:], project='billing')
    transport = oslo_messaging.get_notification_transport(CONF)
    notifier = oslo_messaging.Notifier(transport, 'billing.host1',
                                       serializer=RequestContextSerializer())
    targets = [oslo_messaging.Target(exchange='nova', topic='notifications'),
               oslo_messaging.Target('cinder', 'notifications')]
    listener = oslo_messaging.get_notification_listener(
        transport, targets, [Instances(notifier), Volumes()], executor='threading',
        serializer=RequestContextSerializer(), allow_requeue=True, pool=CONF.billing.pool)
    listener.start()
    print(json.dumps({'ready': True}), flush=True)
    ok = done.wait(30)
    listener.stop()
    listener.wait()
    transport.cleanup()
    print(json.dumps({'done': ok}), flush=True)


if __name__ == '__main__':
    main()
