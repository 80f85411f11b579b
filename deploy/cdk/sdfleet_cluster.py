"""The optional cluster of the stack (``-c cluster=true``): from zero to a running sdfleet.

VPC (two AZs, one NAT gateway, an S3 gateway endpoint, flow logs, subnets tagged for Karpenter
discovery), EKS with a small managed system node group, the EKS Pod Identity agent and Mountpoint
for S3 CSI add-ons, the AWS Load Balancer Controller, Karpenter (roles, interruption queue, chart),
KEDA (chart, with the stack's KEDA role), ECR repositories, and the sdfleet chart itself released
with values computed from the stack's resources. GPU nodes run Bottlerocket's NVIDIA variants
(the chart's EC2NodeClass alias), which ship the NVIDIA driver and device plugin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import aws_cdk as cdk
import yaml
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_s3_assets as assets
from aws_cdk.lambda_layer_kubectl_v33 import KubectlV33Layer
from cdk_nag import NagSuppressions
from constructs import Construct
from sdfleet_apigw import ApiGatewayOptions, SdfleetApiGateway
from sdfleet_karpenter import KarpenterAws
from sdfleet_redis import SdfleetRedis

from sdfleet.deploy import chart_values

if TYPE_CHECKING:
    from sdfleet_stack import SdfleetStack

CHART = Path(__file__).resolve().parents[1] / "helm" / "sdfleet"
KARPENTER_VERSION = "1.14.1"  # the CRDs tests/deploy validates against
KEDA_VERSION = "2.20.2"
IMAGES = ("api", "worker", "agent")
VPC_CIDR = "10.0.0.0/16"
API_PORT = int(yaml.safe_load((CHART / "values.yaml").read_text())["api"]["port"])
"""The API container's port, which the API Gateway's NLB targets."""


@dataclass(frozen=True)
class ClusterOptions:
    """What the cluster stack varies on (CDK context keys in ``app.py``)."""

    identity: Literal["pod-identity", "irsa"] = "pod-identity"
    system_instance_type: str = "m6i.large"
    admin_role_arn: str | None = None
    """An IAM role given cluster-admin (an EKS access entry), e.g. the one you deploy with."""
    public_access_cidr: str | None = None
    """Also open the API server endpoint to this CIDR (default: private endpoint only)."""
    domain: str | None = None
    certificate_arn: str | None = None
    """With ``domain``: the API behind an internet-facing ALB, HTTPS with this ACM certificate."""
    image_tag: str = "0.1.0"
    api_gateway: ApiGatewayOptions | None = None
    """API Gateway (API keys, usage plan, WAF) in front of the API, through a VPC link and an NLB."""
    engine: Literal["aws", "redis"] = "aws"
    """``redis``: the bus and task store on ElastiCache for Valkey (``sdfleet_redis.py``)."""
    redis_node_type: str = "cache.t4g.medium"
    """ElastiCache node type of the ``redis`` engine's primary and replica."""


class SdfleetCluster(Construct):
    """VPC, EKS, add-ons, Karpenter's AWS side and ECR; ``install`` releases the charts."""

    def __init__(self, scope: Construct, construct_id: str, *, name: str, options: ClusterOptions) -> None:
        super().__init__(scope, construct_id)
        self.options = options
        self.vpc = self._vpc(name)
        access = eks.EndpointAccess.PRIVATE
        if options.public_access_cidr:
            access = eks.EndpointAccess.PUBLIC_AND_PRIVATE.only_from(options.public_access_cidr)
        self.cluster = eks.Cluster(
            self,
            "eks",
            cluster_name=name,
            version=eks.KubernetesVersion.V1_33,
            vpc=self.vpc,
            vpc_subnets=[ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)],
            endpoint_access=access,
            default_capacity_type=eks.DefaultCapacityType.NODEGROUP,
            default_capacity=0,
            cluster_logging=list(eks.ClusterLoggingTypes),
            alb_controller=eks.AlbControllerOptions(version=eks.AlbControllerVersion.V2_9_2),
            kubectl_provider_options=eks.KubectlProviderOptions(
                kubectl_layer=KubectlV33Layer(self, "kubectl"), private_subnets=self.vpc.private_subnets
            ),
            tags={"karpenter.sh/discovery": name},
        )
        self.cluster.add_nodegroup_capacity(
            "system",
            instance_types=[ec2.InstanceType(options.system_instance_type)],
            min_size=2,
            max_size=3,
            labels={"sdfleet.io/pool": "system"},
        )
        for addon in ("eks-pod-identity-agent", "aws-mountpoint-s3-csi-driver"):
            # The jsii stubs omit ICluster.kubectl_provider_options from Cluster; CDK accepts it.
            eks.Addon(self, addon, cluster=cast(eks.ICluster, self.cluster), addon_name=addon)
        if options.admin_role_arn:
            policy = eks.AccessPolicy.from_access_policy_name(
                "AmazonEKSClusterAdminPolicy", access_scope_type=eks.AccessScopeType.CLUSTER
            )
            self.cluster.grant_access("admin", options.admin_role_arn, [policy])
        self.karpenter = KarpenterAws(self, "karpenter", cluster=self.cluster)
        self.repositories = {image: self._repository(name, image) for image in IMAGES}
        self.name = name
        self.api_gateway: SdfleetApiGateway | None = None
        self.redis: SdfleetRedis | None = None
        if options.engine == "redis":
            self.redis = SdfleetRedis(
                self,
                "redis",
                name=name,
                vpc=self.vpc,
                clients=self.cluster.cluster_security_group,
                node_type=options.redis_node_type,
            )

    def _vpc(self, name: str) -> ec2.Vpc:
        vpc = ec2.Vpc(
            self,
            "vpc",
            ip_addresses=ec2.IpAddresses.cidr(VPC_CIDR),
            max_azs=2,
            nat_gateways=1,
            subnet_configuration=[
                ec2.SubnetConfiguration(name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24),
                ec2.SubnetConfiguration(
                    name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=19
                ),
            ],
            gateway_endpoints={
                "s3": ec2.GatewayVpcEndpointOptions(service=ec2.GatewayVpcEndpointAwsService.S3)
            },
            flow_logs={"all": ec2.FlowLogOptions(traffic_type=ec2.FlowLogTrafficType.REJECT)},
        )
        for subnet in vpc.private_subnets:  # where Karpenter's EC2NodeClass puts GPU nodes
            cdk.Tags.of(subnet).add("karpenter.sh/discovery", name)
        cdk.Tags.of(vpc).add(
            "karpenter.sh/discovery", name, include_resource_types=["AWS::EC2::SecurityGroup"]
        )
        return vpc

    def _repository(self, name: str, image: str) -> ecr.Repository:
        return ecr.Repository(
            self,
            f"{image}-repository",
            repository_name=f"{name}-{image}",
            image_scan_on_push=True,
            image_tag_mutability=ecr.TagMutability.IMMUTABLE,
            lifecycle_rules=[ecr.LifecycleRule(max_image_count=20)],
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )

    @property
    def oidc_provider_arn(self) -> str:
        return self.cluster.open_id_connect_provider.open_id_connect_provider_arn

    @property
    def oidc_issuer(self) -> str:
        """The issuer without ``https://``, as IRSA condition keys spell it."""
        return cdk.Fn.select(1, cdk.Fn.split("https://", self.cluster.cluster_open_id_connect_issuer_url))

    def install(self, stack: SdfleetStack) -> None:
        """Karpenter, KEDA and the sdfleet chart, in that order (sdfleet's objects need their CRDs)."""
        irsa = self.options.identity == "irsa"
        roles = stack.roles
        if self.redis is not None:
            for role in ("api", "agent", "keda"):
                self.redis.grant(roles[role])
        if self.options.api_gateway is not None:
            self.api_gateway = SdfleetApiGateway(
                self,
                "api-gateway",
                name=self.name,
                vpc=self.vpc,
                vpc_cidr=VPC_CIDR,
                pods=self.cluster.cluster_security_group,
                api_port=API_PORT,
                access_logs=stack.access_logs,
                options=self.options.api_gateway,
            )
        karpenter_values: dict[str, Any] = {
            "settings": {
                "clusterName": self.cluster.cluster_name,
                "interruptionQueue": self.karpenter.queue.queue_name,
            },
            "nodeSelector": {"sdfleet.io/pool": "system"},
        }
        keda_values: dict[str, Any] = {}
        if irsa:
            karpenter_values["serviceAccount"] = {
                "annotations": {"eks.amazonaws.com/role-arn": roles["karpenter"].role_arn}
            }
            keda_values = {
                "podIdentity": {"aws": {"irsa": {"enabled": True, "roleArn": roles["keda"].role_arn}}}
            }
        karpenter = self.cluster.add_helm_chart(
            "karpenter-chart",
            chart="karpenter",
            repository="oci://public.ecr.aws/karpenter/karpenter",
            version=KARPENTER_VERSION,
            namespace="kube-system",
            values=karpenter_values,
        )
        keda = self.cluster.add_helm_chart(
            "keda-chart",
            chart="keda",
            repository="https://kedacore.github.io/charts",
            version=KEDA_VERSION,
            namespace="keda",
            create_namespace=True,
            values=keda_values,
        )
        release = self.cluster.add_helm_chart(
            "sdfleet-chart",
            chart_asset=assets.Asset(self, "chart", path=str(CHART)),
            release=stack.identity.release,
            namespace=stack.identity.namespace,
            create_namespace=True,
            values=self.values(stack),
        )
        release.node.add_dependency(karpenter, keda)
        _suppress_cdk_owned(stack, self.cluster)

    def values(self, stack: SdfleetStack) -> dict[str, Any]:
        """The sdfleet chart's values: ``sdfleet deploy values`` for the fleet, with the stack's
        own queue URLs, URLs, roles, repositories and node role in place of what it would ask for."""
        if self.redis is not None:
            values = chart_values(stack.fleet, engine="redis", redis_address=self.redis.address)
            values["urls"] = {"bus": stack.bus_url, "store": stack.store_url, "storage": stack.storage_url}
            values["redis"] = {
                "address": self.redis.address,
                "enableTLS": True,
                "awsSecret": {"arn": self.redis.secret.secret_arn, "region": cdk.Aws.REGION},
            }
        else:
            values = chart_values(
                stack.fleet, engine="aws", prefix=stack.prefix, region="us-east-1", account="000000000000"
            )
            for q in values["queues"]:
                q["trigger"] = {"queueURL": stack.queues[q["name"]].queue_url}
            values["urls"] = {"bus": stack.bus_url, "store": stack.store_url, "storage": stack.storage_url}
        values["aws"] = {"region": cdk.Aws.REGION}
        tag = self.options.image_tag
        values["images"] = {
            "api": {"repository": self.repositories["api"].repository_uri, "tag": tag},
            "worker": {"repository": self.repositories["worker"].repository_uri, "tag": f"{tag}-cuda"},
            "agent": {"repository": self.repositories["agent"].repository_uri, "tag": tag},
        }
        values["karpenter"] = {
            "clusterName": self.cluster.cluster_name,
            "nodeRole": self.karpenter.node_role.role_name,
        }
        if self.options.identity == "irsa":
            values["serviceAccounts"] = {
                "api": {"roleArn": stack.roles["api"].role_arn},
                "worker": {"roleArn": stack.roles["agent"].role_arn},
            }
            if "ensureJob" in values:  # its hook account takes the API's role (sdfleet_iam.ALSO_RUN_AS)
                values["ensureJob"]["serviceAccount"] = {"roleArn": stack.roles["api"].role_arn}
        values["models"] = {"volume": _models_volume(stack)}
        if stack.input_buckets:  # the buckets the agent role may read (sdfleet_iam.input_rules)
            values["env"] = {"SDFLEET_AGENT__INPUT_S3_BUCKETS": json.dumps(stack.input_buckets)}
        api: dict[str, Any] = {}
        if self.options.domain:
            api["ingress"] = {
                "enabled": True,
                "className": "alb",
                "host": self.options.domain,
                "certificateArn": self.options.certificate_arn or "",
            }
        if self.api_gateway is not None:
            api["targetGroupBinding"] = {"targetGroupARN": self.api_gateway.target_group.target_group_arn}
        if api:
            values["api"] = api
        return values


_CDK_OWNED = [
    {
        "id": "AwsSolutions-IAM4",
        "reason": "the AWS managed policies the EKS user guide prescribes for the cluster role and the "
        "managed node group, and the Lambda execution policies of aws-cdk-lib's kubectl provider",
    },
    {
        "id": "AwsSolutions-IAM5",
        "reason": "aws-cdk-lib's kubectl provider reads its own assets in the CDK asset bucket and invokes "
        "its handler's versions; the AWS Load Balancer Controller's policy is the one it publishes",
    },
    {
        "id": "AwsSolutions-L1",
        "reason": "aws-cdk-lib's own custom resource handlers; their runtime follows aws-cdk-lib",
    },
]


def _suppress_cdk_owned(stack: cdk.Stack, cluster: eks.Cluster) -> None:
    """The findings on constructs aws-cdk-lib makes for EKS (not sdfleet's to change)."""
    NagSuppressions.add_resource_suppressions(cluster, _CDK_OWNED, apply_to_children=True)
    for child in stack.node.children:  # the ALB controller sits at the stack's top level
        if child.node.id.endswith("AlbController"):
            NagSuppressions.add_resource_suppressions(child, _CDK_OWNED[1:2], apply_to_children=True)


def _models_volume(stack: SdfleetStack) -> dict[str, Any]:
    """Mountpoint for S3 on ``models.s3`` (read with the worker's own role), else no volume."""
    url = stack.fleet.models.s3
    if not url:
        return {"type": "none"}
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""  # Mountpoint wants the trailing /
    return {"type": "s3", "s3": {"bucket": bucket, "prefix": prefix, "region": cdk.Aws.REGION}}
