"""The AWS resources of one sdfleet fleet, declared from its ``sdfleet.yaml``.

Topics, queues, DLQs and subscriptions come from ``sdfleet.routing.fleet_topology`` and are named
by ``queue_name``/``topic_name``, the functions the ``aws://`` bus itself uses; the task table is
``DynamoTaskStore``'s own ``table_spec``. Nothing here re-states a name or a key the engine picks.
IAM follows docs/aws.md (roles ``api``, ``agent``, optionally the KEDA operator).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from cdk_nag import NagSuppressions
from constructs import Construct
from sdfleet_adot import adot_collector_role
from sdfleet_cluster import ClusterOptions, SdfleetCluster
from sdfleet_iam import AwsEngine, Identity, agent_statements, api_statements, input_rules, keda_statements

from sdfleet.bus.backends.aws_topology import queue_name, topic_name
from sdfleet.bus.base import DLQ_RETENTION_S, QUEUE_RETENTION_S, QueueSpec, Subscription, dlq_name
from sdfleet.deploy import DEFAULT_PREFIX
from sdfleet.routing import fleet_topology
from sdfleet.settings import FleetConfig
from sdfleet.store.backends.dynamodb import INDEXES, TTL_ATTRIBUTE, table_spec

QUEUE_RETENTION = cdk.Duration.seconds(QUEUE_RETENTION_S)  # what ``ensure()`` and the other engines keep
DLQ_RETENTION = cdk.Duration.seconds(DLQ_RETENTION_S)
MAX_VISIBILITY_S = 43200
ALARM_MINUTES = 5
"""An alarm fires once its condition has held this many minutes in a row."""


def visibility_timeout_s(lease_s: float) -> int:
    """SQS ``VisibilityTimeout`` of a queue with this lease: whole seconds, rounded up (as ``ensure``)."""
    return max(0, min(MAX_VISIBILITY_S, math.ceil(lease_s)))


def _logical(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.replace("_", "-").split("-"))


class SdfleetStack(cdk.Stack):
    """SNS topics, SQS queues + DLQs, subscriptions, the task table, the results bucket and the
    IAM roles of one fleet. ``prefix`` is the ``aws://?prefix=`` of the bus URL the pods use.
    With the cluster on the ``redis`` engine, ElastiCache carries the bus and the store: no topic,
    queue or table is made, and the roles get no SNS, SQS or DynamoDB rights."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        fleet: FleetConfig,
        prefix: str = "sdfleet-",
        bucket_name: str | None = None,
        eks_oidc_provider_arn: str | None = None,
        namespace: str = "sdfleet",
        release: str = "sdfleet",
        storage_prefix: str = "results",
        table_name: str | None = None,
        keda_operator: bool = True,
        cluster_name: str | None = None,
        retain_data: bool = True,
        results_expire_days: int | None = None,
        cluster: ClusterOptions | None = None,
        adot_collector: bool = False,
        input_buckets: Sequence[str] = (),
        alarm_topic_arn: str | None = None,
        queue_wait_alarm_s: int = 900,
        **kwargs: Any,
    ) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.fleet = fleet
        self.input_buckets = sorted({b.strip() for b in input_buckets if b.strip()})
        """The agents' ``agent.input_s3_buckets`` (the release's env with the cluster)."""
        self.input_rules = input_rules(fleet, self.input_buckets)
        self.prefix = prefix
        self.storage_prefix = storage_prefix.strip("/")
        self._removal = cdk.RemovalPolicy.RETAIN if retain_data else cdk.RemovalPolicy.DESTROY
        self.engine = "aws" if cluster is None else cluster.engine
        self.topics: dict[str, sns.ITopic] = {}
        self.queues: dict[str, sqs.Queue] = {}
        self.dead_letter_queues: dict[str, sqs.Queue] = {}
        self.alarm_topic = (
            sns.Topic.from_topic_arn(self, "alarm-topic", alarm_topic_arn) if alarm_topic_arn else None
        )
        """Where the alarms notify (an existing topic); None: alarms without action."""
        self.subscriptions: list[sns.CfnSubscription] = []
        self.table: dynamodb.CfnTable | None = None
        if self.engine == "aws":
            topology = fleet_topology(fleet)
            self.topics = {t: self._topic(t) for t in topology.topics}
            for spec in topology.queues:
                self._queue(spec)
            if queue_wait_alarm_s > 0:
                for q in fleet.queues:  # the task queues: the results queue's reader is the client's
                    self._waiting_alarm(q.name, queue_wait_alarm_s)
            self._allow_delivery(topology.subscriptions)
            self.subscriptions = [self._subscribe(s) for s in topology.subscriptions]
            self.table = self._table(table_name or f"{prefix}tasks")
        self.bucket = self._bucket(bucket_name, results_expire_days)
        self.cluster = (
            None if cluster is None else SdfleetCluster(self, "cluster", name=construct_id, options=cluster)
        )
        self.identity = self._identity(eks_oidc_provider_arn, namespace, release, cluster_name)
        self.roles = self._roles(keda_operator or self.cluster is not None)
        if adot_collector:  # the chart's adot.enabled (sdfleet_adot.py)
            self.roles["adot"] = adot_collector_role(self, self.identity)
        self._outputs()
        if self.cluster is not None:
            self.cluster.install(self)
            self._gateway_outputs()

    def _identity(self, oidc: str | None, namespace: str, release: str, cluster_name: str | None) -> Identity:
        if self.cluster is None:
            return Identity(oidc, namespace, release, cluster_name)
        name = self.cluster.cluster.cluster_name
        if self.cluster.options.identity == "irsa":
            return Identity(
                self.cluster.oidc_provider_arn, namespace, release, name, self.cluster.oidc_issuer
            )
        return Identity(None, namespace, release, name)

    # -- bus -----------------------------------------------------------------------------------

    def _topic(self, topic: str) -> sns.ITopic:
        if topic.startswith("arn:"):  # an existing topic (a seed deployment's), used as is
            return sns.Topic.from_topic_arn(self, f"{topic.rsplit(':', 1)[-1]}-topic", topic)
        return sns.Topic(self, f"{topic}-topic", topic_name=topic_name(self.prefix, topic), enforce_ssl=True)

    def _queue(self, spec: QueueSpec) -> None:
        dlq = sqs.Queue(
            self,
            f"{spec.name}-dlq",
            queue_name=queue_name(self.prefix, dlq_name(spec.name)),
            retention_period=DLQ_RETENTION,
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        self.dead_letter_queues[spec.name] = dlq
        self._dead_letter_alarm(spec.name, dlq)
        self.queues[spec.name] = sqs.Queue(
            self,
            f"{spec.name}-queue",
            queue_name=queue_name(self.prefix, spec.name),
            visibility_timeout=cdk.Duration.seconds(visibility_timeout_s(spec.lease_s)),
            retention_period=QUEUE_RETENTION,
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
            dead_letter_queue=sqs.DeadLetterQueue(queue=dlq, max_receive_count=spec.max_receives),
        )

    def _waiting_alarm(self, queue: str, seconds: int) -> None:
        """An alarm while ``queue``'s oldest task has waited more than ``seconds``: no worker takes
        it (KEDA, pending pods, GPU capacity, image pulls). Keep ``seconds`` above a cold start."""
        metric = self.queues[queue].metric_approximate_age_of_oldest_message(
            period=cdk.Duration.minutes(1), statistic=cloudwatch.Stats.MAXIMUM
        )
        self._alarm(
            f"{queue}-waiting",
            f"{queue_name(self.prefix, queue)}-waiting",
            f"The oldest task of queue {queue} has waited over {seconds} s: no worker takes it. Check "
            "its workers (KEDA ScaledObject, pending pods, GPU capacity, image pulls) with "
            "'sdfleet queues' and kubectl.",
            metric,
            threshold=seconds,
            operator=cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        )

    def _alarm(
        self,
        construct_id: str,
        name: str,
        description: str,
        metric: cloudwatch.Metric,
        *,
        threshold: float,
        operator: cloudwatch.ComparisonOperator,
    ) -> None:
        """In alarm once ``metric`` passed ``threshold`` for ``ALARM_MINUTES`` minutes in a row; a
        queue that sends no data points (empty and idle) is OK; notifies ``alarm_topic``."""
        alarm = cloudwatch.Alarm(
            self,
            construct_id,
            alarm_name=name,
            alarm_description=description,
            metric=metric,
            threshold=threshold,
            comparison_operator=operator,
            evaluation_periods=ALARM_MINUTES,
            treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING,
        )
        if self.alarm_topic is not None:
            alarm.add_alarm_action(cloudwatch_actions.SnsAction(self.alarm_topic))

    def _dead_letter_alarm(self, queue: str, dlq: sqs.Queue) -> None:
        """An alarm while ``queue``'s dead-letter queue holds messages: tasks that failed on every
        try. A DLQ with messages stays active for CloudWatch, so an empty, idle one (no data
        points) is OK, not missing."""
        metric = dlq.metric_approximate_number_of_messages_visible(
            period=cdk.Duration.minutes(1), statistic=cloudwatch.Stats.MAXIMUM
        )
        self._alarm(
            f"{queue}-dead-letters",
            f"{queue_name(self.prefix, dlq_name(queue))}-not-empty",
            f"Messages of queue {queue} failed on every try and wait in its dead-letter queue. "
            f"See them with 'sdfleet dlq list {queue}', run them again with "
            f"'sdfleet dlq redrive {queue}' once the cause is fixed.",
            metric,
            threshold=1,
            operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        )

    def _allow_delivery(self, subscriptions: list[Subscription]) -> None:
        """Queue policies that let exactly the subscribed topics send (as ``ensure``'s ``queue_policy``)."""
        for name, queue in self.queues.items():
            arns = sorted({s.topic for s in subscriptions if s.queue == name})
            if not arns:
                continue
            queue.add_to_resource_policy(
                iam.PolicyStatement(
                    sid="sdfleet-sns-delivery",
                    principals=[iam.ServicePrincipal("sns.amazonaws.com")],
                    actions=["sqs:SendMessage"],
                    resources=[queue.queue_arn],
                    conditions={"ArnEquals": {"aws:SourceArn": [self.topics[t].topic_arn for t in arns]}},
                )
            )

    def _subscribe(self, sub: Subscription) -> sns.CfnSubscription:
        # L1 on purpose: the filter policy goes to SNS exactly as written in sdfleet.yaml (any
        # operator, $or, nested body keys), with its scope; the L2 filter builders cannot express all.
        extra: dict[str, Any] = {}
        if sub.filter_policy is not None:
            extra = {"filter_policy": sub.filter_policy, "filter_policy_scope": sub.scope}
        return sns.CfnSubscription(
            self,
            f"{sub.queue}-subscription",
            protocol="sqs",
            topic_arn=self.topics[sub.topic].topic_arn,
            endpoint=self.queues[sub.queue].queue_arn,
            raw_message_delivery=True,
            **extra,
        )

    # -- store and storage ---------------------------------------------------------------------

    def _table(self, name: str) -> dynamodb.CfnTable:
        spec = table_spec(name)
        table = dynamodb.CfnTable(
            self,
            "tasks-table",
            table_name=spec["TableName"],
            billing_mode=spec["BillingMode"],
            attribute_definitions=[
                dynamodb.CfnTable.AttributeDefinitionProperty(
                    attribute_name=a["AttributeName"], attribute_type=a["AttributeType"]
                )
                for a in spec["AttributeDefinitions"]
            ],
            key_schema=_keys(spec["KeySchema"]),
            global_secondary_indexes=[
                dynamodb.CfnTable.GlobalSecondaryIndexProperty(
                    index_name=g["IndexName"],
                    key_schema=_keys(g["KeySchema"]),
                    projection=dynamodb.CfnTable.ProjectionProperty(
                        projection_type=g["Projection"]["ProjectionType"]
                    ),
                )
                for g in spec.get("GlobalSecondaryIndexes", [])
            ],
            point_in_time_recovery_specification=dynamodb.CfnTable.PointInTimeRecoverySpecificationProperty(
                point_in_time_recovery_enabled=True
            ),
            # On whether or not the fleet sets retain_days: only records that carry the attribute
            # (finished ones, with retain_days) expire, and turning it on later needs no deploy.
            time_to_live_specification=dynamodb.CfnTable.TimeToLiveSpecificationProperty(
                enabled=True, attribute_name=TTL_ATTRIBUTE
            ),
        )
        table.apply_removal_policy(self._removal)
        return table

    def _bucket(self, name: str | None, expire_days: int | None) -> s3.Bucket:
        rules = [
            s3.LifecycleRule(id="abort-uploads", abort_incomplete_multipart_upload_after=cdk.Duration.days(7))
        ]
        if expire_days:
            rules.append(
                s3.LifecycleRule(
                    id="expire-results",
                    prefix=f"{self.storage_prefix}/" if self.storage_prefix else None,
                    expiration=cdk.Duration.days(expire_days),
                )
            )
        logs = s3.Bucket(
            self,
            "access-logs-bucket",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            lifecycle_rules=[s3.LifecycleRule(id="expire-logs", expiration=cdk.Duration.days(90))],
            removal_policy=self._removal,
        )
        NagSuppressions.add_resource_suppressions(
            logs, [{"id": "AwsSolutions-S1", "reason": "the access-log bucket itself: logging it would loop"}]
        )
        self.access_logs = logs
        return s3.Bucket(
            self,
            "results-bucket",
            bucket_name=name,
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            lifecycle_rules=rules,
            removal_policy=self._removal,
            server_access_logs_bucket=logs,
            server_access_logs_prefix="results/",
        )

    # -- IAM -----------------------------------------------------------------------------------

    def _roles(self, keda_operator: bool) -> dict[str, iam.Role]:
        objects = self.bucket.arn_for_objects(f"{self.storage_prefix}/*" if self.storage_prefix else "*")
        storage = (self.bucket.bucket_arn, objects, self.storage_prefix)
        engine = self._aws_engine()
        statements = {
            "api": api_statements(storage, engine),
            "agent": agent_statements(storage, self.fleet, engine, self.input_rules),
        }
        if keda_operator:
            statements["keda"] = keda_statements(engine)
        if self.cluster is not None:
            statements["karpenter"] = self.cluster.karpenter.statements
        roles = {role: self.identity.role(self, role, policy) for role, policy in statements.items()}
        for role in ("api", "agent"):
            NagSuppressions.add_resource_suppressions(
                roles[role],
                [
                    {
                        "id": "AwsSolutions-IAM5",
                        "reason": "object actions on the keys under the results prefix (and the models "
                        "and input prefixes): S3 names objects only by key pattern; the bucket and "
                        "prefix are fixed",
                        "appliesTo": [{"regex": "/^Resource::.*/[^*]*\\*(\\.thumb\\.jpg)?$/"}],
                    }
                ],
            )
        if "karpenter" in roles:
            reason = (
                "Karpenter launches, tags and terminates instances and launch templates it names at run "
                "time; the actions are scoped to this region (aws:RequestedRegion)"
            )
            NagSuppressions.add_resource_suppressions(
                roles["karpenter"], [{"id": "AwsSolutions-IAM5", "reason": reason}]
            )
        return roles

    def _aws_engine(self) -> AwsEngine | None:
        if self.table is None:
            return None
        table = (self.table.attr_arn, *(f"{self.table.attr_arn}/index/{i}" for i in INDEXES))
        return AwsEngine(
            tasks_topic=self.topics[self.fleet.tasks_topic],
            results_topic=self.topics[self.fleet.results_topic],
            queues=[self.queues[q.name] for q in self.fleet.queues],
            dlqs=[self.dead_letter_queues[q.name] for q in self.fleet.queues],
            table=table,
        )

    # -- outputs -------------------------------------------------------------------------------

    def _outputs(self) -> None:
        out = self._output
        if self.table is not None:
            tasks, results = self.topics[self.fleet.tasks_topic], self.topics[self.fleet.results_topic]
            out("TasksTopicArn", tasks.topic_arn, "SNS topic tasks are published to")
            out("ResultsTopicArn", results.topic_arn, "SNS topic of task events")
            for name, queue in self.queues.items():
                out(f"QueueUrl{_logical(name)}", queue.queue_url, f"SQS queue of fleet queue {name}")
                out(
                    f"DeadLetterQueueUrl{_logical(name)}",
                    self.dead_letter_queues[name].queue_url,
                    f"DLQ of {name}",
                )
            out("TableName", self.table.ref, "DynamoDB task table")
        out("BucketName", self.bucket.bucket_name, "S3 bucket of images and .out JSON")
        for role, r in self.roles.items():
            out(f"{_logical(role)}RoleArn", r.role_arn, f"IAM role of the {role} service account")
        out("BusUrl", self.bus_url, "SDFLEET_BUS_URL")
        out("StoreUrl", self.store_url, "SDFLEET_STORE_URL")
        out("StorageUrl", self.storage_url, "SDFLEET_STORAGE_URL")
        if self.input_buckets:
            out("AgentInputBuckets", json.dumps(self.input_buckets), "SDFLEET_AGENT__INPUT_S3_BUCKETS")
        if self.cluster is not None:
            name = self.cluster.cluster.cluster_name
            out("ClusterName", name, "EKS cluster")
            out(
                "KubeconfigCommand",
                f"aws eks update-kubeconfig --name {name} --region {cdk.Aws.REGION}",
                "kubectl",
            )
            for image, repo in self.cluster.repositories.items():
                out(
                    f"{_logical(image)}Repository",
                    repo.repository_uri,
                    f"ECR repository of the {image} image",
                )

    def _gateway_outputs(self) -> None:
        gateway = self.cluster.api_gateway if self.cluster is not None else None
        if gateway is None:
            return
        self._output("ApiGatewayUrl", gateway.url, "API Gateway URL of the API (send x-api-key)")
        for key_name, key in gateway.keys.items():
            self._output(
                f"ApiKeyId{_logical(key_name)}",
                key.key_id,
                f"API key {key_name}: aws apigateway get-api-key --include-value --api-key <id>",
            )

    @property
    def bus_url(self) -> str:
        redis = self.cluster.redis if self.cluster is not None else None
        if redis is not None:
            return redis.url(DEFAULT_PREFIX["redis"])
        return f"aws://?prefix={self.prefix}&region={cdk.Aws.REGION}&account={cdk.Aws.ACCOUNT_ID}"

    @property
    def store_url(self) -> str:
        if self.table is None:
            return self.bus_url  # the redis engine: one Redis for bus and store
        return f"aws://?table={self.table.ref}&region={cdk.Aws.REGION}&create=false"

    @property
    def storage_url(self) -> str:
        suffix = f"/{self.storage_prefix}" if self.storage_prefix else ""
        return f"s3://{self.bucket.bucket_name}{suffix}"

    def _output(self, output_id: str, value: str, description: str) -> None:
        cdk.CfnOutput(self, output_id, value=value, description=description)


def _keys(schema: list[dict[str, str]]) -> list[dynamodb.CfnTable.KeySchemaProperty]:
    return [
        dynamodb.CfnTable.KeySchemaProperty(attribute_name=k["AttributeName"], key_type=k["KeyType"])
        for k in schema
    ]
