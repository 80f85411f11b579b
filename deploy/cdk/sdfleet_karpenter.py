"""Karpenter's AWS side for the cluster stack: the node role (and its EKS access entry), the
controller's permissions, and the interruption queue with the EventBridge rules that feed it
(spot interruption warnings, rebalance recommendations, scheduled changes, instance state changes),
as Karpenter's getting-started CloudFormation template creates them."""

from __future__ import annotations

from typing import cast

import aws_cdk as cdk
from aws_cdk import aws_eks_v2 as eks
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_sqs as sqs
from cdk_nag import NagSuppressions
from constructs import Construct

NODE_POLICIES = (
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryPullOnly",
    "AmazonSSMManagedInstanceCore",
)
_EVENTS = {
    "spot-interruption": ("aws.ec2", "EC2 Spot Instance Interruption Warning"),
    "rebalance": ("aws.ec2", "EC2 Instance Rebalance Recommendation"),
    "state-change": ("aws.ec2", "EC2 Instance State-change Notification"),
    "scheduled-change": ("aws.health", "AWS Health Event"),
}


class KarpenterAws(Construct):
    """Node role, interruption queue and rules, and the controller's policy statements."""

    def __init__(self, scope: Construct, construct_id: str, *, cluster: eks.Cluster) -> None:
        super().__init__(scope, construct_id)
        self.node_role = iam.Role(
            self,
            "node-role",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
            managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(p) for p in NODE_POLICIES],
            description="Karpenter GPU nodes of the sdfleet cluster",
        )
        eks.AccessEntry(
            self,
            "node-access",
            # The jsii stubs omit ICluster.kubectl_provider_options from Cluster; CDK accepts it.
            cluster=cast(eks.ICluster, cluster),
            principal=self.node_role.role_arn,
            access_entry_type=eks.AccessEntryType.EC2_LINUX,
            access_policies=[],
        )
        self.queue = sqs.Queue(
            self,
            "interruption-queue",
            retention_period=cdk.Duration.minutes(5),
            encryption=sqs.QueueEncryption.SQS_MANAGED,
            enforce_ssl=True,
        )
        for name, (source, detail_type) in _EVENTS.items():
            events.Rule(
                self,
                f"{name}-rule",
                event_pattern=events.EventPattern(source=[source], detail_type=[detail_type]),
                targets=[targets.SqsQueue(self.queue)],
            )
        self.statements = self._controller_statements(cluster)
        NagSuppressions.add_resource_suppressions(
            self.node_role,
            [
                {
                    "id": "AwsSolutions-IAM4",
                    "reason": "the AWS managed node policies EKS documents for worker nodes",
                }
            ],
        )
        NagSuppressions.add_resource_suppressions(
            self.queue,
            [
                {
                    "id": "AwsSolutions-SQS3",
                    "reason": "Karpenter consumes every event once; a stale one has no use",
                }
            ],
        )

    def _controller_statements(self, cluster: eks.Cluster) -> list[iam.PolicyStatement]:
        """Karpenter v1's controller policy, condensed: EC2 fleet and launch templates, the
        instance profile of its node role, pricing and AMI parameters, its queue."""
        ec2 = [
            "ec2:CreateFleet", "ec2:RunInstances", "ec2:CreateLaunchTemplate", "ec2:DeleteLaunchTemplate",
            "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeAvailabilityZones", "ec2:DescribeImages",
            "ec2:DescribeInstances", "ec2:DescribeInstanceTypeOfferings", "ec2:DescribeInstanceTypes",
            "ec2:DescribeLaunchTemplates", "ec2:DescribeSecurityGroups", "ec2:DescribeSpotPriceHistory",
            "ec2:DescribeSubnets", "ec2:DescribeCapacityReservations", "ec2:DescribePlacementGroups",
        ]  # fmt: skip
        profiles = [
            "iam:CreateInstanceProfile", "iam:TagInstanceProfile", "iam:AddRoleToInstanceProfile",
            "iam:RemoveRoleFromInstanceProfile", "iam:DeleteInstanceProfile", "iam:GetInstanceProfile",
            "iam:ListInstanceProfiles",
        ]  # fmt: skip
        partition, region, account = cdk.Aws.PARTITION, cdk.Aws.REGION, cdk.Aws.ACCOUNT_ID
        in_region = {"StringEquals": {"aws:RequestedRegion": region}}
        queue = ["sqs:DeleteMessage", "sqs:GetQueueUrl", "sqs:ReceiveMessage"]
        return [
            iam.PolicyStatement(actions=ec2, resources=["*"], conditions=in_region),
            iam.PolicyStatement(actions=["iam:PassRole"], resources=[self.node_role.role_arn]),
            iam.PolicyStatement(
                actions=profiles, resources=[f"arn:{partition}:iam::{account}:instance-profile/*"]
            ),
            iam.PolicyStatement(
                actions=["ssm:GetParameter"],
                resources=[f"arn:{partition}:ssm:{region}::parameter/aws/service/*"],
            ),
            iam.PolicyStatement(actions=["pricing:GetProducts"], resources=["*"]),
            iam.PolicyStatement(actions=queue, resources=[self.queue.queue_arn]),
            iam.PolicyStatement(actions=["eks:DescribeCluster"], resources=[cluster.cluster_arn]),
        ]
