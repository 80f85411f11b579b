"""A managed Redis for the ``redis`` engine (``-c engine=redis`` with the cluster): ElastiCache for
Valkey, in the cluster's private subnets, reached only from the cluster's nodes.

Multi-AZ with one replica and automatic failover; TLS required in transit, encrypted at rest; an
AUTH token generated into Secrets Manager, which the pods read with their own roles
(``password_secret=`` on the Redis URL) and KEDA with its operator's (``awsSecretManager``), so the
token is in no URL, manifest or template; ``maxmemory-policy noeviction``, so a full Redis refuses
writes (the API answers 503, agents retry) instead of evicting queued tasks or their records.
"""

from __future__ import annotations

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticache as elasticache
from aws_cdk import aws_iam as iam
from aws_cdk import aws_secretsmanager as secretsmanager
from cdk_nag import NagSuppressions
from constructs import Construct

PORT = 6380  # not the default 6379 (cdk-nag AwsSolutions-AEC5)
ENGINE, ENGINE_VERSION, FAMILY = "valkey", "8.0", "valkey8"


class SdfleetRedis(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name: str,
        vpc: ec2.IVpc,
        clients: ec2.ISecurityGroup,
        node_type: str,
    ) -> None:
        super().__init__(scope, construct_id)
        self.secret = secretsmanager.Secret(
            self,
            "auth-token",
            description=f"AUTH token of {name}'s Redis (ElastiCache for Valkey)",
            # ElastiCache takes 16-128 printable characters without @, " or /: letters and digits
            generate_secret_string=secretsmanager.SecretStringGenerator(
                password_length=64, exclude_punctuation=True
            ),
        )
        NagSuppressions.add_resource_suppressions(
            self.secret,
            [
                {
                    "id": "AwsSolutions-SMG4",
                    "reason": "an ElastiCache AUTH token is rotated with modify-replication-group "
                    "(--auth-token-update-strategy ROTATE, docs/deploy-aws.md), not by a Secrets Manager "
                    "rotation Lambda; the pods re-read the secret within a minute",
                }
            ],
        )
        self.security_group = ec2.SecurityGroup(
            self,
            "sg",
            vpc=vpc,
            description=f"{name} Redis: from the cluster nodes only",
            allow_all_outbound=False,
        )
        self.security_group.add_ingress_rule(clients, ec2.Port.tcp(PORT), "sdfleet pods and KEDA")
        subnets = elasticache.CfnSubnetGroup(
            self,
            "subnets",
            description=f"{name} Redis: private subnets",
            subnet_ids=[s.subnet_id for s in vpc.private_subnets],
        )
        parameters = elasticache.CfnParameterGroup(
            self,
            "parameters",
            cache_parameter_group_family=FAMILY,
            description="sdfleet: refuse writes when full instead of evicting tasks",
            properties={"maxmemory-policy": "noeviction"},
        )
        self.group = elasticache.CfnReplicationGroup(
            self,
            "redis",
            replication_group_description=f"{name}: sdfleet bus (Redis Streams) and task store",
            engine=ENGINE,
            engine_version=ENGINE_VERSION,
            cache_node_type=node_type,
            num_cache_clusters=2,
            automatic_failover_enabled=True,
            multi_az_enabled=True,
            transit_encryption_enabled=True,
            transit_encryption_mode="required",
            at_rest_encryption_enabled=True,
            auth_token=self.secret.secret_value.unsafe_unwrap(),  # a CloudFormation dynamic reference
            port=PORT,
            cache_subnet_group_name=subnets.ref,
            cache_parameter_group_name=parameters.ref,
            security_group_ids=[self.security_group.security_group_id],
            snapshot_retention_limit=1,
        )

    @property
    def address(self) -> str:
        return f"{self.group.attr_primary_end_point_address}:{self.group.attr_primary_end_point_port}"

    def url(self, prefix: str) -> str:
        """The pods' bus and store URL: TLS, the token from Secrets Manager, the key prefix."""
        return f"rediss://{self.address}/0?prefix={prefix}&password_secret={self.secret.secret_arn}"

    def grant(self, role: iam.IGrantable) -> None:
        self.secret.grant_read(role)
