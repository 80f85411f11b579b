"""API Gateway in front of the API (``-c api_gateway=true``, with the cluster), as the seed's stack has.

A regional REST API whose every method needs an API key, one usage plan (throttle, optional daily
quota) holding the keys, AWS WAF (AWS managed common and known-bad-inputs rules), access and
execution logs. Behind it, through a VPC link, an internal Network Load Balancer whose target group
the AWS Load Balancer Controller fills with the API pods' addresses (the chart's
``api.targetGroupBinding``), so no Kubernetes object has to exist when the stack is created. TLS ends
at API Gateway (its own certificate on ``execute-api``); the VPC link's traffic stays in the VPC.
"""

from __future__ import annotations

from dataclasses import dataclass

import aws_cdk as cdk
from aws_cdk import aws_apigateway as apigw
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_wafv2 as wafv2
from cdk_nag import NagSuppressions
from constructs import Construct

STAGE = "prod"  # the seed's stage name: clients keep their URLs


@dataclass(frozen=True)
class ApiGatewayOptions:
    """The usage plan (CDK context ``api_rate_limit``, ``api_burst_limit``, ``api_quota_per_day``,
    ``api_keys``)."""

    rate_limit: float = 100.0
    """Steady requests per second per API key."""
    burst_limit: int = 200
    quota_per_day: int | None = None
    """Requests per key per day; None: no quota."""
    keys: tuple[str, ...] = ("default",)
    """One API key per name (``<stack>-<name>``), all in the usage plan."""


class SdfleetApiGateway(Construct):
    """REST API → VPC link → internal NLB → the API pods (by a TargetGroupBinding)."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        name: str,
        vpc: ec2.IVpc,
        vpc_cidr: str,
        pods: ec2.ISecurityGroup,
        api_port: int,
        access_logs: s3.IBucket,
        options: ApiGatewayOptions,
    ) -> None:
        super().__init__(scope, construct_id)
        private = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        self.nlb = elbv2.NetworkLoadBalancer(
            self, "nlb", vpc=vpc, internet_facing=False, vpc_subnets=private, cross_zone_enabled=True
        )
        self.nlb.log_access_logs(access_logs, prefix="api-nlb")
        self.target_group = elbv2.NetworkTargetGroup(
            self,
            "api-pods",
            vpc=vpc,
            port=api_port,
            protocol=elbv2.Protocol.TCP,
            target_type=elbv2.TargetType.IP,
            deregistration_delay=cdk.Duration.seconds(30),
            health_check=elbv2.HealthCheck(protocol=elbv2.Protocol.HTTP, path="/healthz"),
        )
        self.nlb.add_listener("http", port=80, default_target_groups=[self.target_group])
        # The NLB has no security group: the pods see its private addresses (IP targets, no
        # client IP preservation), so the nodes' group admits the VPC on the API's port only.
        pods.add_ingress_rule(
            ec2.Peer.ipv4(vpc_cidr), ec2.Port.tcp(api_port), "sdfleet API from its NLB (VPC link)"
        )
        link = apigw.VpcLink(self, "link", targets=[self.nlb], vpc_link_name=f"{name}-api")
        access = logs.LogGroup(self, "access-log", retention=logs.RetentionDays.THREE_MONTHS)
        self.api = apigw.RestApi(
            self,
            "api",
            rest_api_name=f"{name}-api",
            description=f"sdfleet API of {name}: every method needs an API key (x-api-key)",
            endpoint_types=[apigw.EndpointType.REGIONAL],
            cloud_watch_role=True,
            cloud_watch_role_removal_policy=cdk.RemovalPolicy.DESTROY,
            api_key_source_type=apigw.ApiKeySourceType.HEADER,
            deploy_options=apigw.StageOptions(
                stage_name=STAGE,
                access_log_destination=apigw.LogGroupLogDestination(access),
                access_log_format=apigw.AccessLogFormat.json_with_standard_fields(
                    caller=True,
                    http_method=True,
                    ip=True,
                    protocol=True,
                    request_time=True,
                    resource_path=True,
                    response_length=True,
                    status=True,
                    user=True,
                ),
                logging_level=apigw.MethodLoggingLevel.ERROR,
                metrics_enabled=True,
                tracing_enabled=True,
            ),
        )
        validator = self.api.add_request_validator("parameters", validate_request_parameters=True)

        def backend(path: str, params: dict[str, str] | None = None) -> apigw.Integration:
            return apigw.Integration(
                type=apigw.IntegrationType.HTTP_PROXY,
                integration_http_method="ANY",
                uri=f"http://{self.nlb.load_balancer_dns_name}{path}",
                options=apigw.IntegrationOptions(
                    connection_type=apigw.ConnectionType.VPC_LINK, vpc_link=link, request_parameters=params
                ),
            )

        self.api.root.add_method("ANY", backend("/"), api_key_required=True, request_validator=validator)
        self.api.root.add_resource("{proxy+}").add_method(
            "ANY",
            backend("/{proxy}", {"integration.request.path.proxy": "method.request.path.proxy"}),
            api_key_required=True,
            request_parameters={"method.request.path.proxy": True},
            request_validator=validator,
        )
        quota = None
        if options.quota_per_day:
            quota = apigw.QuotaSettings(limit=options.quota_per_day, period=apigw.Period.DAY)
        plan = self.api.add_usage_plan(
            "plan",
            name=f"{name}-api",
            throttle=apigw.ThrottleSettings(rate_limit=options.rate_limit, burst_limit=options.burst_limit),
            quota=quota,
            api_stages=[apigw.UsagePlanPerApiStage(api=self.api, stage=self.api.deployment_stage)],
        )
        self.keys = {}
        for key_name in options.keys:
            key = self.api.add_api_key(f"key-{key_name}", api_key_name=f"{name}-{key_name}")
            plan.add_api_key(key)
            self.keys[key_name] = key
        self._waf(name)
        self._suppress()

    def _waf(self, name: str) -> None:
        def managed(rule_set: str, priority: int, counted: list[str]) -> wafv2.CfnWebACL.RuleProperty:
            return wafv2.CfnWebACL.RuleProperty(
                name=rule_set,
                priority=priority,
                override_action=wafv2.CfnWebACL.OverrideActionProperty(none={}),
                statement=wafv2.CfnWebACL.StatementProperty(
                    managed_rule_group_statement=wafv2.CfnWebACL.ManagedRuleGroupStatementProperty(
                        vendor_name="AWS",
                        name=rule_set,
                        rule_action_overrides=[
                            wafv2.CfnWebACL.RuleActionOverrideProperty(
                                name=rule, action_to_use=wafv2.CfnWebACL.RuleActionProperty(count={})
                            )
                            for rule in counted
                        ]
                        or None,
                    )
                ),
                visibility_config=_visibility(f"{name}-{rule_set}"),
            )

        acl = wafv2.CfnWebACL(
            self,
            "waf",
            scope="REGIONAL",
            default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            visibility_config=_visibility(f"{name}-api"),
            rules=[
                # img2img, inpaint and upscale bodies carry base64 images, far over the set's 8 KB
                # body limit: that one rule only counts.
                managed("AWSManagedRulesCommonRuleSet", 0, ["SizeRestrictions_BODY"]),
                managed("AWSManagedRulesKnownBadInputsRuleSet", 1, []),
            ],
        )
        wafv2.CfnWebACLAssociation(
            self, "waf-stage", resource_arn=self.api.deployment_stage.stage_arn, web_acl_arn=acl.attr_arn
        )

    def _suppress(self) -> None:
        NagSuppressions.add_resource_suppressions(
            self.api,
            [
                {
                    "id": "AwsSolutions-APIG4",
                    "reason": "callers are identified by API keys in a usage plan (the seed's scheme) and, "
                    "per tenant, by sdfleet's own API keys, which the API checks",
                },
                {
                    "id": "AwsSolutions-APIG2",
                    "reason": "request parameters are validated here; bodies by the API itself (pydantic "
                    "models, 4xx with the reason): a proxy method has no model for API Gateway to check",
                },
                {
                    "id": "AwsSolutions-COG4",
                    "reason": "no Cognito user pool: machine clients with API keys, as the seed's API",
                },
                {
                    "id": "AwsSolutions-IAM4",
                    "reason": "API Gateway's account-level CloudWatch role uses the managed policy AWS "
                    "documents for it (AmazonAPIGatewayPushToCloudWatchLogs)",
                },
            ],
            apply_to_children=True,
        )

    @property
    def url(self) -> str:
        return self.api.url


def _visibility(metric: str) -> wafv2.CfnWebACL.VisibilityConfigProperty:
    return wafv2.CfnWebACL.VisibilityConfigProperty(
        cloud_watch_metrics_enabled=True, metric_name=metric, sampled_requests_enabled=True
    )
