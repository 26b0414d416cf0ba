#!/usr/bin/env bash
# One-time AWS set-up for ray_cluster.yaml: security group, IAM instance profiles, EFS file system. Idempotent.
#
#   ADMIN_CIDR=203.0.113.7/32 VPC_ID=vpc-... SUBNET_ID=subnet-... BUCKET=my-bucket [REGION=us-west-2] \
#     cluster/aws_prereqs.sh
#
# Runs with your own AWS CLI credentials (they never go to the cluster) and prints the values ray_cluster.yaml needs.
#   security group  <NAME>-ray: SSH (22) from ADMIN_CIDR only, all traffic between members of the group (Ray's
#                   ports, NFS to the EFS mount target). Nothing else: no 0.0.0.0/0 rule, no dashboard (8265) or
#                   MLflow (5000) port from outside; those are reached through SSH port forwarding.
#   IAM             role + instance profile <NAME>-ray-head: read/write s3://BUCKET/mdlda/* (the MLflow server
#                   writes the artifacts, the head copies the raw audio), plus launching/terminating this
#                   cluster's instances and passing the worker role to them (what Ray's autoscaler needs);
#                   <NAME>-ray-worker: read-only s3://BUCKET/mdlda/mlartifacts/* (the model artifacts), nothing
#                   else: the chain writes only to EFS (shards, Ray storage, results) and through the MLflow
#                   server, which holds the artifact write access and checks every request's login.
#   EFS             encrypted, elastic throughput, one mount target in SUBNET_ID in the security group.
set -euo pipefail

die() { echo "aws_prereqs.sh: $*" >&2; exit 1; }
: "${ADMIN_CIDR:?set ADMIN_CIDR to the address range SSH may come from, e.g. 203.0.113.7/32}"
: "${VPC_ID:?set VPC_ID}" "${SUBNET_ID:?set SUBNET_ID}" "${BUCKET:?set BUCKET (without s3://)}"
REGION="${REGION:-us-west-2}"
NAME="${NAME:-mdlda}"
export AWS_DEFAULT_REGION="$REGION"

[[ "$ADMIN_CIDR" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}/([0-9]{1,2})$ ]] || die "ADMIN_CIDR must look like a.b.c.d/nn"
prefix="${ADMIN_CIDR##*/}"
(( prefix >= 8 )) || die "refusing ADMIN_CIDR=$ADMIN_CIDR: SSH must not be open to (nearly) the whole internet"

account="$(aws sts get-caller-identity --query Account --output text)"
sg_name="$NAME-ray"
worker_role="$NAME-ray-worker"
head_role="$NAME-ray-head"

# --- security group -------------------------------------------------------------------------------------------
sg_id="$(aws ec2 describe-security-groups \
  --filters "Name=vpc-id,Values=$VPC_ID" "Name=group-name,Values=$sg_name" \
  --query 'SecurityGroups[0].GroupId' --output text)"
if [[ -z "$sg_id" || "$sg_id" == None ]]; then
  sg_id="$(aws ec2 create-security-group --group-name "$sg_name" --vpc-id "$VPC_ID" \
    --description "mdlda Ray cluster: SSH from admin CIDR, all traffic within the group" \
    --query GroupId --output text)"
  aws ec2 authorize-security-group-ingress --group-id "$sg_id" --ip-permissions "$(cat <<EOF
[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
  "IpRanges": [{"CidrIp": "$ADMIN_CIDR", "Description": "admin SSH"}]},
 {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "$sg_id", "Description": "within the cluster"}]}]
EOF
)" > /dev/null
  echo "created security group $sg_id"
else
  echo "security group $sg_name exists ($sg_id); its rules are left as they are"
fi

# --- IAM roles and instance profiles --------------------------------------------------------------------------
trust='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
  "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}'
s3_statements="{\"Effect\": \"Allow\", \"Action\": [\"s3:ListBucket\", \"s3:GetBucketLocation\"],
   \"Resource\": \"arn:aws:s3:::$BUCKET\"},
  {\"Effect\": \"Allow\",
   \"Action\": [\"s3:GetObject\", \"s3:PutObject\", \"s3:DeleteObject\", \"s3:AbortMultipartUpload\"],
   \"Resource\": \"arn:aws:s3:::$BUCKET/mdlda/*\"}"
# Workers: read the model artifacts, list only under them; no write, no delete.
worker_policy="{\"Version\": \"2012-10-17\", \"Statement\": [
  {\"Effect\": \"Allow\", \"Action\": \"s3:ListBucket\", \"Resource\": \"arn:aws:s3:::$BUCKET\",
   \"Condition\": {\"StringLike\": {\"s3:prefix\": [\"mdlda/mlartifacts/*\"]}}},
  {\"Effect\": \"Allow\", \"Action\": \"s3:GetObject\",
   \"Resource\": \"arn:aws:s3:::$BUCKET/mdlda/mlartifacts/*\"}]}"
head_policy="{\"Version\": \"2012-10-17\", \"Statement\": [$s3_statements,
  {\"Effect\": \"Allow\", \"Action\": [\"ec2:RunInstances\", \"ec2:CreateTags\", \"ec2:DescribeInstances\",
     \"ec2:DescribeInstanceTypes\", \"ec2:DescribeImages\", \"ec2:DescribeSubnets\",
     \"ec2:DescribeSecurityGroups\", \"ec2:DescribeKeyPairs\"], \"Resource\": \"*\"},
  {\"Effect\": \"Allow\", \"Action\": [\"ec2:TerminateInstances\", \"ec2:StopInstances\", \"ec2:StartInstances\"],
   \"Resource\": \"*\", \"Condition\": {\"StringEquals\": {\"aws:ResourceTag/ray-cluster-name\": \"$NAME\"}}},
  {\"Effect\": \"Allow\", \"Action\": \"iam:PassRole\",
   \"Resource\": \"arn:aws:iam::$account:role/$worker_role\"}]}"

make_profile() {  # role name, inline policy
  local role="$1" policy="$2"
  aws iam get-role --role-name "$role" > /dev/null 2>&1 \
    || aws iam create-role --role-name "$role" --assume-role-policy-document "$trust" > /dev/null
  aws iam put-role-policy --role-name "$role" --policy-name "$role" --policy-document "$policy"
  if ! aws iam get-instance-profile --instance-profile-name "$role" > /dev/null 2>&1; then
    aws iam create-instance-profile --instance-profile-name "$role" > /dev/null
    aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
  fi
}
make_profile "$worker_role" "$worker_policy"
make_profile "$head_role" "$head_policy"

# --- EFS ------------------------------------------------------------------------------------------------------
fs_id="$(aws efs describe-file-systems --creation-token "$NAME-shared" \
  --query 'FileSystems[0].FileSystemId' --output text)"
if [[ -z "$fs_id" || "$fs_id" == None ]]; then
  fs_id="$(aws efs create-file-system --creation-token "$NAME-shared" --encrypted --throughput-mode elastic \
    --tags "Key=Name,Value=$NAME-shared" --query FileSystemId --output text)"
  echo "created EFS $fs_id"
fi
for _ in $(seq 1 60); do
  state="$(aws efs describe-file-systems --file-system-id "$fs_id" --query 'FileSystems[0].LifeCycleState' \
    --output text)"
  [[ "$state" == available ]] && break
  sleep 5
done
[[ "$state" == available ]] || die "EFS $fs_id is $state, not available"
targets="$(aws efs describe-mount-targets --file-system-id "$fs_id" --query 'length(MountTargets)' --output text)"
if [[ "$targets" == 0 ]]; then
  aws efs create-mount-target --file-system-id "$fs_id" --subnet-id "$SUBNET_ID" --security-groups "$sg_id" \
    > /dev/null
fi

cat <<EOF

Put these into ray_cluster.yaml (grep -n CHANGE-ME ray_cluster.yaml):
  SecurityGroupIds: [$sg_id]
  SubnetIds:        [$SUBNET_ID]
  head   IamInstanceProfile Arn: arn:aws:iam::$account:instance-profile/$head_role
  worker IamInstanceProfile Arn: arn:aws:iam::$account:instance-profile/$worker_role
  EFS mount source: $fs_id.efs.$REGION.amazonaws.com:/
  bucket:           $BUCKET
Your own credentials (for ray up) also need iam:PassRole on both roles. New instance profiles take a minute to
become usable.
EOF
